//! `dovetail-bench`: a vhost-user-blk load generator (`run`, `verify`), the side-by-side
//! benchmark (`compare`), the live-reconfiguration pause benchmark (`pause`), the migration
//! benchmark (`migrate`), the annotation-overhead benchmark (`annotate`), the soak (`soak`) and
//! the seccomp filters' cost (`seccomp`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dovetail_bench::annotate::{self, AnnotateOptions};
use dovetail_bench::compare::{self, CompareOptions};
use dovetail_bench::load::{self, Limit, Pattern, Report, Workload};
use dovetail_bench::migrate::{self, MigrateOptions};
use dovetail_bench::pause::{self, PauseOptions, Provenance};
use dovetail_bench::units::{parse_duration, parse_size};
use dovetail_bench::verify::VerifyState;

#[derive(Debug, Parser)]
#[command(
    name = "dovetail-bench",
    version,
    about = "Drives any vhost-user-blk backend from the host, and compares dovetail with \
             qemu-storage-daemon and host fio."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a workload against a vhost-user-blk socket and report IOPS, MB/s and latency.
    Run(RunArgs),
    /// Read every block recorded in a verify state file once and check it.
    Verify(VerifyArgs),
    /// Benchmark host fio, qemu-storage-daemon and dovetail on one file; write BENCHMARKS.md.
    Compare(CompareArgs),
    /// Measure the pause live reconfigurations (tee, policy, snapshot, untee through the control
    /// socket) cost a busy guest, against the same load without them.
    Pause(PauseArgs),
    /// A host's day: running disks under random writes with FLUSH while other disks are
    /// created, attached, detached and deleted over the control socket; write its section of
    /// BENCHMARKS.md.
    Hostday(HostdayArgs),
    /// Measure the copy-out migration: its throughput against dd, a busy guest's IOPS with and
    /// without it running, and the pause of the promote that follows; write its section of
    /// BENCHMARKS.md.
    Migrate(MigrateArgs),
    /// Measure what parallax-v2's per-block annotations cost: a parallax-v1 and a parallax-v2
    /// disk served side by side, 4 KiB random I/O alternating between them; write its section of
    /// BENCHMARKS.md.
    Annotate(AnnotateArgs),
    /// Measure parallax-v2's tiering in process on a two-tier store: hot-set reads before and
    /// after the mover promotes the set, compressed cold reads, against plain reads of the tier
    /// files; write its section of BENCHMARKS.md.
    Tiers(TiersArgs),
    /// Measure the stalls FLUSH and timer commits cause under 4 KiB random writes: raw,
    /// parallax-v1 and parallax-v2 side by side; write its section of BENCHMARKS.md.
    Commits(CommitsArgs),
    /// The comparison's cells on direct I/O with the page cache dropped: dovetail --cache none
    /// against qemu-storage-daemon (cache.direct=on, aio=io_uring and aio=native, an iothread)
    /// and host fio --direct=1 --ioengine=io_uring, with CPU time per request; write its section
    /// of BENCHMARKS.md.
    Direct(DirectArgs),
    /// Measure single-instance blocks: the store space of a disk written in full, alone and as
    /// a 2-member Tee after a copy-out, with and without them, and a 2-member Tee's 4 KiB IOPS
    /// with and without them; write its section of BENCHMARKS.md.
    Sis(SisArgs),
    /// Every layout under verified load for N minutes: copy-outs, snapshots, random FLUSH,
    /// fault rules turned on and off, control-socket abuse and kill -9 with restarts; fails on
    /// any acknowledged write lost or read back wrong (RELIABILITY.md, *The soak*).
    Soak(SoakArgs),
    /// What the daemon's seccomp filters cost: 4 KiB random reads and writes at QD32 against
    /// `serve --cache none --seccomp off` and `--seccomp trap`, alternating in one run.
    Seccomp(SeccompArgs),
}

#[derive(Debug, Args)]
struct SisArgs {
    /// Size of the disk (default 1G).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Time per IOPS phase (default 10s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    duration: Option<Duration>,
    /// Pairs of IOPS phases (default 2).
    #[arg(long, default_value = "2", value_name = "N")]
    pairs: u32,
    /// FLUSH every N random writes (default 1000).
    #[arg(long, default_value = "1000", value_name = "N")]
    flush_every: u64,
    /// Requests in flight (default 8).
    #[arg(long, default_value = "8", value_name = "N")]
    iodepth: u16,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the image, stores, sockets and logs (default: target/bench-sis).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// The Markdown file whose section is rewritten (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

fn sis(a: SisArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-sis"));
    let o = dovetail_bench::sis::SisOptions {
        dovetail,
        dir: dir.clone(),
        size: a.size.unwrap_or(1 << 30),
        seconds: a.duration.unwrap_or(Duration::from_secs(10)),
        pairs: a.pairs.max(1),
        flush_every: a.flush_every,
        iodepth: a.iodepth.max(1),
    };
    let r = dovetail_bench::sis::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", dovetail_bench::sis::tables(&r));
    }
    if !a.no_write {
        record_section(
            &workspace,
            &dir,
            a.out,
            dovetail_bench::sis::TITLE,
            |machine, command, when| dovetail_bench::sis::section(&r, machine, command, when),
            dovetail_bench::sis::write_section,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct CommitsArgs {
    /// Size of each disk (default 1G).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Time per cell (default 10s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    duration: Option<Duration>,
    /// FLUSH every N writes per queue, one cell each (0: none; default 32,20000,0).
    #[arg(long, value_delimiter = ',', value_name = "N")]
    flush_every: Vec<u64>,
    /// Which cells to run: `single` (one disk per layout, per FLUSH interval), `tenants` (four
    /// disks on one store, one noisy; and qemu-storage-daemon with four files). Default: both.
    #[arg(long, value_delimiter = ',', value_name = "CELLS")]
    cells: Vec<dovetail_bench::commits::CellSet>,
    /// qemu-storage-daemon for the four-tenant cell ("none": leave it out).
    #[arg(long, default_value = "qemu-storage-daemon", value_name = "PATH")]
    qsd: PathBuf,
    /// Serve the stores with `serve --store DIR --cache MODE` (`none`: the tier files on direct
    /// I/O). Default: the daemon's own default (writeback).
    #[arg(long, value_name = "MODE")]
    store_cache: Option<String>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the image, store, sockets and logs (default: target/bench-commits).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// The Markdown file whose section is rewritten (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

fn commits(a: CommitsArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-commits"));
    let o = dovetail_bench::commits::CommitsOptions {
        dovetail,
        dir: dir.clone(),
        size: a.size.unwrap_or(1 << 30),
        duration: a.duration.unwrap_or(Duration::from_secs(10)),
        flush_every: if a.flush_every.is_empty() {
            vec![32, 20000, 0]
        } else {
            a.flush_every
        },
        cells: if a.cells.is_empty() {
            vec![
                dovetail_bench::commits::CellSet::Single,
                dovetail_bench::commits::CellSet::Tenants,
            ]
        } else {
            a.cells
        },
        qsd: (a.qsd.as_os_str() != "none").then_some(a.qsd),
        store_cache: a.store_cache,
    };
    let r = dovetail_bench::commits::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", dovetail_bench::commits::tables(&r));
    }
    if !a.no_write {
        record_section(
            &workspace,
            &dir,
            a.out,
            dovetail_bench::commits::TITLE,
            |machine, command, when| dovetail_bench::commits::section(&r, machine, command, when),
            dovetail_bench::commits::write_section,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct DirectArgs {
    /// Size of the backing file (default 2G).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Time per cell and system (default 5s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    duration: Option<Duration>,
    /// Only the cells whose label contains this (e.g. "randread 4K QD32"); repeated: any of
    /// them.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    #[arg(long, default_value = "qemu-storage-daemon", value_name = "PATH")]
    qsd: PathBuf,
    #[arg(long, default_value = "fio", value_name = "PATH")]
    fio: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// The Markdown file whose section is rewritten (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Directory for the backing file, sockets and logs (default: target/bench-direct in the
    /// workspace).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

fn direct(a: DirectArgs) -> Result<ExitCode, BoxError> {
    use dovetail_bench::direct;
    let workspace = workspace(a.workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-direct"));
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let cells = compare::cells()
        .into_iter()
        .filter(|c| a.only.is_empty() || a.only.iter().any(|o| c.label().contains(o.as_str())))
        .collect::<Vec<_>>();
    if cells.is_empty() {
        return Err("--only matches no cell".into());
    }
    let o = direct::DirectOptions {
        dir: dir.clone(),
        size: a.size.unwrap_or(2 << 30),
        duration: a.duration.unwrap_or(Duration::from_secs(5)),
        dovetail,
        qsd: a.qsd.clone(),
        fio: a.fio.clone(),
        cells,
    };
    let r = direct::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", direct::tables(&r));
    }
    if !a.no_write {
        let (qsd, fio) = (a.qsd, a.fio);
        let out = a.out.unwrap_or_else(|| workspace.join("BENCHMARKS.md"));
        let args: Vec<String> = std::env::args().skip(1).collect();
        let command = format!(
            "cargo run --release -p dovetail-bench -- {}",
            args.join(" ")
        );
        let machine = compare::machine_of(&workspace, &dir, Some((&qsd, &fio)));
        let section = direct::section(&r, &machine, &command, &compare::utc_now());
        direct::write_section(&out, &section)?;
        eprintln!(
            "wrote the section \"{}\" of {}",
            direct::TITLE,
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct TiersArgs {
    /// Seconds per measurement (default 4).
    #[arg(long, value_name = "N")]
    seconds: Option<f64>,
    /// Size of the disk (default 512M).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// The Markdown file whose section is rewritten (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Directory for the store and the slow tier (default: target/bench-tiers in the
    /// workspace); the fast tier goes to /dev/shm when it exists.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

fn tiers(a: TiersArgs) -> Result<ExitCode, BoxError> {
    use dovetail_bench::tiers;
    let workspace = workspace(a.workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-tiers"));
    let mut o = tiers::TiersOptions::new(dir.clone());
    if let Some(s) = a.seconds {
        if !(s.is_finite() && s > 0.0) {
            return Err("--seconds must be a positive number".into());
        }
        o.duration = Duration::from_secs_f64(s);
    }
    if let Some(size) = a.size {
        if size < 64 << 20 || size % 4096 != 0 {
            return Err("--size must be at least 64M and a multiple of 4K".into());
        }
        o.size = size;
    }
    let r = tiers::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", tiers::tables(&r));
    }
    if !a.no_write {
        record_section(
            &workspace,
            &dir,
            a.out,
            tiers::TITLE,
            |machine, command, when| tiers::section(&r, machine, command, when),
            tiers::write_section,
        )?;
    }
    Ok(if r.exact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(Debug, Args)]
struct Common {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1, value_name = "N")]
    iodepth: u16,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1, value_name = "N")]
    queues: usize,
    /// Poll the used ring instead of sleeping on the call eventfd.
    #[arg(long)]
    poll: bool,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
    /// Pin queue thread i to the i-th CPU of this list (e.g. 0,1).
    #[arg(long, value_delimiter = ',', value_name = "CPUS")]
    cpus: Vec<usize>,
    /// Fail if a request takes longer than this.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "TIME")]
    timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pattern: Pattern,
    /// Percentage of reads with --pattern randrw.
    #[arg(long, default_value_t = 50, value_name = "PERCENT")]
    rwmix: u8,
    /// Bytes per request (a multiple of 512: 4k, 64k, 1M, ...).
    #[arg(long, default_value = "4k", value_parser = parse_size, value_name = "SIZE")]
    bs: u64,
    /// Run for this long (the default: 10s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME", conflicts_with_all = ["total", "passes"])]
    duration: Option<Duration>,
    /// Stop after this many bytes in all.
    #[arg(long, value_parser = parse_size, value_name = "SIZE", conflicts_with = "passes")]
    total: Option<u64>,
    /// Issue as many requests as the region has blocks, this many times (with a sequential
    /// pattern: every block exactly once per pass).
    #[arg(long, value_name = "N")]
    passes: Option<u64>,
    /// Byte offset of the region under test.
    #[arg(long, default_value = "0", value_parser = parse_size, value_name = "SIZE")]
    offset: u64,
    /// Length of the region under test (default: to the end of the disk).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    length: Option<u64>,
    /// Write self-describing blocks (offset, sequence number, crc32c in every sector) and check
    /// every block read against the record of acknowledged writes.
    #[arg(long)]
    verify: bool,
    /// Keep the record of acknowledged writes in this file: loaded if it exists, saved at the
    /// end even when the backend fails mid-run. Implies --verify.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Send a FLUSH on each queue after every N writes (its requests in flight complete
    /// first); with --verify the writes a FLUSH covered become stable in the record, what
    /// `verify --after-crash` demands back after a crash. 0: never flush.
    #[arg(long, default_value_t = 0, value_name = "N")]
    flush_every: u64,
    /// Seed for offsets and data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    common: Common,
    /// The state file written by `run --state`.
    #[arg(long, value_name = "FILE")]
    state: PathBuf,
    /// The backend crashed since the record was written (kill -9, power loss): demand only
    /// what a FLUSH made stable (a later write to a block is accepted too, sector by sector),
    /// then update the record to what the disk holds now, so `run --state` can go on.
    #[arg(long)]
    after_crash: bool,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// A fast smoke run: 1 s per cell and (unless --size is given) a 256 MiB file.
    #[arg(long)]
    quick: bool,
    /// Size of the backing file (default 1G).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Time per cell and system (default 5s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    duration: Option<Duration>,
    /// The Markdown write-up (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The PNG chart (default: bench/benchmarks.png in the workspace).
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the backing file, sockets and logs (default: target/bench-compare in the
    /// workspace).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    #[arg(long, default_value = "qemu-storage-daemon", value_name = "PATH")]
    qsd: PathBuf,
    #[arg(long, default_value = "fio", value_name = "PATH")]
    fio: PathBuf,
    /// Skip the pinned generator-overhead measurement.
    #[arg(long)]
    no_overhead: bool,
    /// Skip the live-reconfiguration section (`dovetail-bench pause`).
    #[arg(long)]
    no_pause: bool,
}

#[derive(Debug, Args)]
struct SeccompArgs {
    /// Size of the backing file (default 1G).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Time per cell and run (default 5s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    duration: Option<Duration>,
    /// Runs of each mode, alternating (default 3).
    #[arg(long, default_value_t = 3, value_name = "N")]
    rounds: u32,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the backing file, socket and logs (default: target/bench-seccomp).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

fn seccomp(a: SeccompArgs) -> Result<ExitCode, BoxError> {
    use dovetail_bench::seccomp_cost;
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let o = seccomp_cost::SeccompOptions {
        dovetail,
        dir: a
            .dir
            .unwrap_or_else(|| workspace.join("target").join("bench-seccomp")),
        size: a.size.unwrap_or(1 << 30),
        duration: a.duration.unwrap_or(Duration::from_secs(5)),
        rounds: a.rounds.max(1),
    };
    let r = seccomp_cost::run(&o)?;
    println!("{}", seccomp_cost::table(&r));
    let errors: u64 = r.iter().map(|c| c.io_errors).sum();
    if errors > 0 {
        eprintln!("{errors} request(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 30.0, value_name = "N")]
    minutes: f64,
    /// Time between kill -9s of both daemons (default: a third of the run, at most 3 min).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    kill_every: Option<Duration>,
    /// Size of each disk (default 64M).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// `serve --cache` for the store daemon (default: the daemon's own).
    #[arg(long, value_name = "MODE")]
    cache: Option<String>,
    /// A dovetail binary to use instead of building one with `cargo build --release`. The
    /// store faults need one built with `--features dovetail-backend/failpoints`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// The store daemon's `serve --store-faults` rules, switched on for a few seconds every
    /// --store-fault-every (default: failed syncs that lose what was unsynced, EIO on a few
    /// writes, slow I/O; `soak::DEFAULT_STORE_FAULTS`).
    #[arg(long, value_name = "RULES", conflicts_with = "no_store_faults")]
    store_faults: Option<String>,
    /// No store faults (for a daemon built without fault injection).
    #[arg(long)]
    no_store_faults: bool,
    /// Time between store-fault windows (default 90s).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    store_fault_every: Option<Duration>,
    /// Directory for the store, image, sockets, logs, CSV and PNG (default: target/bench-soak).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn soak(a: SoakArgs) -> Result<ExitCode, BoxError> {
    use dovetail_bench::soak;
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-soak"));
    // The daemon takes only absolute socket paths.
    let dir = std::path::absolute(&dir)?;
    if !(a.minutes > 0.0 && a.minutes <= 7.0 * 24.0 * 60.0) {
        return Err(format!("--minutes {} is not in (0, 10080]", a.minutes).into());
    }
    let mut o = soak::SoakOptions::new(
        dovetail,
        dir.join("run"),
        Duration::from_secs_f64(a.minutes * 60.0),
    );
    if let Some(k) = a.kill_every {
        o.kill_every = k.max(Duration::from_secs(5));
    }
    if let Some(s) = a.size {
        o.size = s;
    }
    o.cache = a.cache;
    if a.no_store_faults {
        o.store_faults = None;
    } else if let Some(rules) = a.store_faults {
        o.store_faults = Some(rules);
    }
    if let Some(e) = a.store_fault_every {
        o.store_fault_every = e.max(Duration::from_secs(20));
    }
    let r = soak::run(&o)?;
    std::fs::write(dir.join("soak.csv"), soak::csv(&r))?;
    soak::plot(&r, &dir.join("soak.png"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", soak::tables(&r));
    }
    eprintln!(
        "footprint samples: {}; chart: {}",
        dir.join("soak.csv").display(),
        dir.join("soak.png").display()
    );
    Ok(if r.passed() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "soak FAILED: lost {}, wrong {}, bad lines accepted {}, hello failures {}",
            r.lost(),
            r.wrong(),
            r.abuse_accepted,
            r.hello_failures
        );
        ExitCode::FAILURE
    })
}

#[derive(Debug, Args)]
struct HostdayArgs {
    /// Length of the quiet phase and of the churn phase (whole waves, at least one).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "TIME")]
    duration: Duration,
    /// Disks that churn (created, attached, detached, deleted in waves).
    #[arg(long, default_value_t = 32, value_name = "N")]
    churn: usize,
    /// Disks under load.
    #[arg(long, default_value_t = 4, value_name = "N")]
    running: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Write the section into --out (replacing it between its marker comments).
    #[arg(long)]
    write: bool,
    /// The Markdown file for --write (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the store, sockets and the daemon's log (default: target/bench-hostday).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// One more argument for the daemon's `serve` (repeat it: `--serve-arg=--cache
    /// --serve-arg=none`), to measure a variant; the section says which were given.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    serve_arg: Vec<String>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PauseArgs {
    /// Length of the baseline phase, and of the reconfiguration phase (as many whole cycles as
    /// fit).
    #[arg(long, default_value = "20s", value_parser = parse_duration, value_name = "TIME")]
    duration: Duration,
    /// Run exactly N reconfiguration cycles; the reconfiguration phase lasts as long as they
    /// take.
    #[arg(long, value_name = "N")]
    cycles: Option<u32>,
    /// Time between two commands of a cycle.
    #[arg(long, default_value = "500ms", value_parser = parse_duration, value_name = "TIME")]
    gap: Duration,
    /// Access pattern of the guest's load.
    #[arg(long, value_enum, default_value = "randrw")]
    pattern: Pattern,
    /// Percentage of reads with --pattern randrw.
    #[arg(long, default_value_t = 70, value_name = "PERCENT")]
    rwmix: u8,
    /// Bytes per request.
    #[arg(long, default_value = "4k", value_parser = parse_size, value_name = "SIZE")]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_name = "N")]
    iodepth: u16,
    /// Queues (the daemon serves as many), one generator thread each.
    #[arg(long, default_value_t = 2, value_name = "N")]
    queues: usize,
    /// Size of the disk (written in full before the phases).
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    size: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Write the section "Live reconfiguration" into --out (replacing it between its marker
    /// comments, or inserting it), leaving the rest of the file as it is.
    #[arg(long)]
    write: bool,
    /// The Markdown file for --write (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the store, sockets and the daemon's log (default: target/bench-pause in
    /// the workspace).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// A short smoke run: 256 MiB copied twice, a 256 MiB working set, a 1 s warm-up and 2
    /// pairs of 2 s phases; BENCHMARKS.md is left alone.
    #[arg(long)]
    quick: bool,
    /// Bytes copied by dd and by the offline copy-out (default 1G; 256M with --quick).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// dd / copy-out pairs (default 3; 2 with --quick).
    #[arg(long, value_name = "N")]
    reps: Option<u32>,
    /// Length of each baseline and with-copy-out phase (default 10s; 2s with --quick).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    duration: Option<Duration>,
    /// Baseline / with-copy-out pairs of phases, ordered B W, W B, B W, ... (default 4; 2 with
    /// --quick).
    #[arg(long, value_name = "N")]
    pairs: Option<u32>,
    /// The load alone before the first phase, not counted (default 5s; 1s with --quick).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    warmup: Option<Duration>,
    /// The guest's load covers the first SIZE bytes of the served disk (default 1G; 256M with
    /// --quick).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    working_set: Option<u64>,
    /// Size of the served disk (default: the working set plus 1.5 times what the copy-out
    /// copies at 64 MiB/s in all with-copy-out phases, in 256 MiB steps).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    serve_size: Option<u64>,
    /// The candidate's validation policy.
    #[arg(long, default_value = "lazy-hashes", value_name = "POLICY")]
    policy: String,
    /// Percentage of reads of the guest's random 4 KiB load.
    #[arg(long, default_value_t = 70, value_name = "PERCENT")]
    rwmix: u8,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_name = "N")]
    iodepth: u16,
    /// Queues (the daemon serves as many), one generator thread each.
    #[arg(long, default_value_t = 2, value_name = "N")]
    queues: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Leave BENCHMARKS.md alone (the default with --quick).
    #[arg(long)]
    no_write: bool,
    /// The Markdown file whose section is rewritten (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the stores, dd's files, sockets and the daemon's log (default:
    /// target/bench-migrate in the workspace).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct AnnotateArgs {
    /// A smoke run: 256 MiB disks, 1 s runs, 2 pairs; BENCHMARKS.md is left alone.
    #[arg(long)]
    quick: bool,
    /// Seconds per run (default 10; 1 with --quick).
    #[arg(long, value_name = "N")]
    seconds: Option<f64>,
    /// Pairs of runs (v1, v2) per workload (default 3; 2 with --quick).
    #[arg(long, value_name = "N")]
    reps: Option<u32>,
    /// Seconds of unmeasured randwrite on each disk before the randwrite pairs, in two runs, 0
    /// for none (default: as long as a run).
    #[arg(long, value_name = "N")]
    warmup: Option<f64>,
    /// Size of each disk, written in full first (default 1G; 256M with --quick).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    size: Option<u64>,
    /// Queues the daemon serves and the QD32 workloads use.
    #[arg(long, default_value_t = 2, value_name = "N")]
    queues: usize,
    /// Requests in flight per queue of the randread/randwrite workloads (the third is QD1).
    #[arg(long, default_value_t = 32, value_name = "N")]
    iodepth: u16,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Leave BENCHMARKS.md alone (the default with --quick).
    #[arg(long)]
    no_write: bool,
    /// The Markdown file whose section is rewritten (default: BENCHMARKS.md in the workspace).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// A dovetail binary to use instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    dovetail: Option<PathBuf>,
    /// Directory for the store, sockets and the daemon's log (default: target/bench-annotate
    /// in the workspace).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The workspace root.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Verify(a) => verify(a),
        Cmd::Compare(a) => compare(a),
        Cmd::Pause(a) => pause(a),
        Cmd::Hostday(a) => hostday(a),
        Cmd::Soak(a) => soak(a),
        Cmd::Seccomp(a) => seccomp(a),
        Cmd::Migrate(a) => migrate(a),
        Cmd::Annotate(a) => annotate(a),
        Cmd::Tiers(a) => tiers(a),
        Cmd::Commits(a) => commits(a),
        Cmd::Direct(a) => direct(a),
        Cmd::Sis(a) => sis(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dovetail-bench: {}", dovetail_layout::error_chain(&*e));
            ExitCode::from(2)
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

fn workload(c: &Common, pattern: Pattern) -> Workload {
    Workload {
        iodepth: c.iodepth,
        queues: c.queues,
        poll: c.poll,
        event_idx: !c.no_event_idx,
        cpus: c.cpus.clone(),
        timeout: c.timeout,
        ..Workload::new(pattern)
    }
}

/// Prints the report; the exit code says whether anything failed (I/O errors or corruption).
fn finish(report: &Report, json: bool) -> Result<ExitCode, BoxError> {
    let summary = report.summary();
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    let corrupt = summary.verify.as_ref().map_or(0, |v| v.corrupt.len());
    Ok(if corrupt > 0 || summary.io_errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn run(a: RunArgs) -> Result<ExitCode, BoxError> {
    let block_size = u32::try_from(a.bs).map_err(|_| "--bs is too large")?;
    let limit = match (a.duration, a.total, a.passes) {
        (_, Some(t), _) => Limit::Bytes(t),
        (_, _, Some(p)) => Limit::Passes(p),
        (Some(d), _, _) => Limit::Time(d),
        _ => Limit::Time(Duration::from_secs(10)),
    };
    let verify = a.verify || a.state.is_some();
    let mut w = Workload {
        read_percent: a.rwmix,
        block_size,
        limit,
        verify,
        seed: a.seed,
        flush_every: a.flush_every,
        ..workload(&a.common, a.pattern)
    };
    let (driver, device) = load::connect(&a.common.socket, &w)?;
    let length = a
        .length
        .unwrap_or_else(|| device.capacity.saturating_sub(a.offset));
    w.region = Some((a.offset, length));
    let mut state = if verify {
        let (offset, blocks) = load::region(&w, &device)?;
        Some(match &a.state {
            Some(p) => VerifyState::load_or_new(p, block_size, offset, blocks)?,
            None => VerifyState::new(block_size, offset, blocks),
        })
    } else {
        None
    };
    let result = load::run(&driver, &device, &w, state.as_mut());
    // The record is saved whatever happened: after a backend crash it is what a later
    // `verify` checks against.
    if let (Some(path), Some(s)) = (&a.state, &state) {
        s.save(path)?;
        if result.is_err() {
            let in_flight = s.blocks.iter().filter(|b| b.in_flight != 0).count();
            eprintln!(
                "dovetail-bench: acknowledged writes recorded in {} ({in_flight} writes were in \
                 flight)",
                path.display()
            );
        }
    }
    finish(&result?, a.common.json)
}

fn verify(a: VerifyArgs) -> Result<ExitCode, BoxError> {
    let bytes = std::fs::read(&a.state)
        .map_err(|e| format!("cannot read the state file {}: {e}", a.state.display()))?;
    let mut state = VerifyState::decode(&bytes)?;
    let w = Workload {
        block_size: state.block_size,
        limit: Limit::Passes(1),
        region: Some((
            state.offset,
            state.blocks.len() as u64 * u64::from(state.block_size),
        )),
        verify: true,
        ..workload(&a.common, Pattern::Read)
    };
    let (driver, device) = load::connect(&a.common.socket, &w)?;
    if a.after_crash {
        let check = load::check_after_crash(&driver, &mut state, 1 << 20)?;
        if a.common.json {
            println!("{}", serde_json::to_string_pretty(&check)?);
        } else {
            println!(
                "after the crash: {} blocks checked, {} with a stable write, {} holding a later \
                 write, {} lost",
                check.checked,
                check.stable,
                check.newer,
                check.lost.len()
            );
            for c in &check.lost {
                println!("    {c}");
            }
        }
        if !check.lost.is_empty() {
            return Ok(ExitCode::from(1));
        }
        state.save(&a.state)?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = load::run(&driver, &device, &w, Some(&mut state))?;
    finish(&report, a.common.json)
}

/// Rewrites one benchmark's section of `out` (default: BENCHMARKS.md in the workspace):
/// `make` writes it from the machine, the command that ran and the time.
fn record_section(
    workspace: &Path,
    dir: &Path,
    out: Option<PathBuf>,
    title: &str,
    make: impl FnOnce(&compare::Machine, &str, &str) -> String,
    write: impl FnOnce(&Path, &str) -> Result<(), compare::CompareError>,
) -> Result<(), BoxError> {
    let out = out.unwrap_or_else(|| workspace.join("BENCHMARKS.md"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = format!(
        "cargo run --release -p dovetail-bench -- {}",
        args.join(" ")
    );
    let machine = compare::machine_of(workspace, dir, None);
    let section = make(&machine, &command, &compare::utc_now());
    write(&out, &section)?;
    eprintln!("wrote the section \"{title}\" of {}", out.display());
    Ok(())
}

fn workspace(given: Option<PathBuf>) -> Result<PathBuf, BoxError> {
    Ok(match given {
        Some(w) => w,
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or("no workspace directory")?
            .to_path_buf(),
    })
}

fn compare(a: CompareArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let size = a.size.unwrap_or(if a.quick { 256 << 20 } else { 1 << 30 });
    let duration = a.duration.unwrap_or(if a.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    });
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = CompareOptions {
        size,
        duration,
        out: a.out.unwrap_or_else(|| workspace.join("BENCHMARKS.md")),
        chart: a
            .chart
            .unwrap_or_else(|| workspace.join("bench").join("benchmarks.png")),
        dovetail: a.dovetail,
        qsd: a.qsd,
        fio: a.fio,
        dir: a
            .dir
            .unwrap_or_else(|| workspace.join("target").join("bench-compare")),
        command: format!(
            "cargo run --release -p dovetail-bench -- {}",
            args.join(" ")
        ),
        overhead: !a.no_overhead,
        pause: !a.no_pause,
        workspace,
    };
    let results = dovetail_bench::comparison::compare(&opts)?;
    println!(
        "wrote {} and {} ({:.0} s)",
        opts.out.display(),
        opts.chart.display(),
        results.runtime.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn hostday(a: HostdayArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-hostday"));
    let o = dovetail_bench::hostday::HostdayOptions {
        duration: a.duration,
        churn: a.churn,
        running: a.running,
        serve_args: a.serve_arg,
        ..dovetail_bench::hostday::HostdayOptions::new(dovetail, dir.clone())
    };
    let r = dovetail_bench::hostday::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", dovetail_bench::hostday::tables(&r));
    }
    if a.write {
        record_section(
            &workspace,
            &dir,
            a.out,
            dovetail_bench::hostday::TITLE,
            |_machine, command, when| dovetail_bench::hostday::section(&r, command, when),
            |out, section| {
                dovetail_bench::section::write(
                    out,
                    section,
                    dovetail_bench::hostday::BEGIN,
                    dovetail_bench::hostday::END,
                    None,
                )
            },
        )?;
    }
    Ok(if r.quiet.io_errors + r.churning.io_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn pause(a: PauseArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-pause"));
    let o = PauseOptions {
        size: a.size,
        duration: a.duration,
        cycles: a.cycles,
        gap: a.gap,
        pattern: a.pattern,
        read_percent: a.rwmix,
        block_size: u32::try_from(a.bs).map_err(|_| "--bs is too large")?,
        iodepth: a.iodepth,
        queues: a.queues,
        ..PauseOptions::new(dovetail, dir.clone())
    };
    let r = pause::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", pause::tables(&r));
    }
    if a.write {
        record_section(
            &workspace,
            &dir,
            a.out,
            pause::TITLE,
            |machine, command, when| {
                pause::section(&r, machine, Provenance::Alone { command, when })
            },
            pause::write_section,
        )?;
    }
    Ok(if r.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `q` for a --quick run, else `full`.
fn pick<T>(quick: bool, q: T, full: T) -> T {
    if quick {
        q
    } else {
        full
    }
}

fn migrate(a: MigrateArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-migrate"));
    let d = MigrateOptions::new(dovetail, dir.clone());
    let duration = a
        .duration
        .unwrap_or(pick(a.quick, Duration::from_secs(2), d.duration));
    let pairs = a.pairs.unwrap_or(pick(a.quick, 2, d.pairs));
    let working_set = a
        .working_set
        .unwrap_or(pick(a.quick, 256 << 20, d.working_set));
    let o = MigrateOptions {
        size: a.size.unwrap_or(pick(a.quick, 256 << 20, d.size)),
        reps: a.reps.unwrap_or(pick(a.quick, 2, d.reps)),
        serve_size: a
            .serve_size
            .unwrap_or_else(|| migrate::auto_serve_size(working_set, duration, pairs)),
        working_set,
        duration,
        pairs,
        warmup: a
            .warmup
            .unwrap_or(pick(a.quick, Duration::from_secs(1), d.warmup)),
        policy: a.policy,
        read_percent: a.rwmix,
        iodepth: a.iodepth,
        queues: a.queues,
        ..d
    };
    let r = migrate::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", migrate::tables(&r));
    }
    if !a.no_write && !a.quick {
        record_section(
            &workspace,
            &dir,
            a.out,
            migrate::TITLE,
            |machine, command, when| migrate::section(&r, machine, command, when),
            migrate::write_section,
        )?;
    }
    Ok(if r.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn annotate(a: AnnotateArgs) -> Result<ExitCode, BoxError> {
    let workspace = workspace(a.workspace)?;
    let dovetail = dovetail_or_build(a.dovetail, &workspace)?;
    let dir = a
        .dir
        .unwrap_or_else(|| workspace.join("target").join("bench-annotate"));
    let d = if a.quick {
        AnnotateOptions::quick(dovetail, dir.clone())
    } else {
        AnnotateOptions::new(dovetail, dir.clone())
    };
    let duration = match a.seconds {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
        Some(_) => return Err("--seconds must be a positive number".into()),
        None => d.duration,
    };
    let warmup = match a.warmup {
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        Some(_) => return Err("--warmup must be a number of seconds".into()),
        None => duration,
    };
    let o = AnnotateOptions {
        size: a.size.unwrap_or(d.size),
        reps: a.reps.unwrap_or(d.reps),
        duration,
        warmup,
        queues: a.queues,
        iodepth: a.iodepth,
        ..d
    };
    let r = annotate::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", annotate::tables(&r));
    }
    if !a.no_write && !a.quick {
        record_section(
            &workspace,
            &dir,
            a.out,
            annotate::TITLE,
            |machine, command, when| annotate::section(&r, machine, command, when),
            annotate::write_section,
        )?;
    }
    Ok(if r.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The dovetail binary a benchmark runs: the one given, or a release build of the workspace.
fn dovetail_or_build(given: Option<PathBuf>, workspace: &Path) -> Result<PathBuf, BoxError> {
    match given {
        Some(p) => Ok(p),
        None => {
            eprintln!("building dovetail (release) ...");
            Ok(compare::build_dovetail(workspace)?)
        }
    }
}
