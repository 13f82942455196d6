//! `dovetail-bench compare`: host fio, qemu-storage-daemon and dovetail on one backing file,
//! under the same workloads, written up as BENCHMARKS.md with a chart.
//!
//! Every cell runs on every system back to back (cell-major order), so the systems see the same
//! page cache and dirty state. Each vhost-user daemon is started fresh for its cell and stopped
//! after it, and the file is fsynced between cells so a write cell's dirty pages do not spill
//! into the next one.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::chart::{bar_chart, ChartError, Series};
use crate::fill::fill_pattern;
use crate::load::{self, LoadError, Pattern, Workload};
use crate::units::format_size;

/// Settings of one comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Size of the backing file.
    pub size: u64,
    /// How long each cell runs on each system.
    pub duration: Duration,
    /// Where the write-up goes.
    pub out: PathBuf,
    /// Where the chart goes.
    pub chart: PathBuf,
    /// The workspace (for building dovetail and naming its revision).
    pub workspace: PathBuf,
    /// The dovetail binary; built from the workspace when `None`.
    pub dovetail: Option<PathBuf>,
    pub qsd: PathBuf,
    pub fio: PathBuf,
    /// Directory for the backing file, sockets and logs.
    pub dir: PathBuf,
    /// The command line, as quoted in the write-up.
    pub command: String,
    /// Also measure how much CPU the generator needs to keep a pinned backend busy.
    pub overhead: bool,
    /// Also measure the pause a live reconfiguration costs a busy guest (see
    /// [`crate::pause`]).
    pub pause: bool,
}

/// Why the comparison failed.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read fio's output: {0}")]
    FioOutput(String),
    #[error("{system}, cell {cell}")]
    Load {
        system: &'static str,
        cell: String,
        #[source]
        source: LoadError,
    },
    #[error("{0} did not create its socket within 10 s (log: {1})")]
    NoSocket(&'static str, PathBuf),
    #[error(transparent)]
    Chart(#[from] ChartError),
    #[error("{0}")]
    Pause(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

/// One workload of the comparison.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub pattern: Pattern,
    pub block_size: u32,
    pub iodepth: u16,
    pub queues: usize,
}

impl Cell {
    pub fn label(&self) -> String {
        format!(
            "{} {} QD{} x{}q",
            self.pattern.name(),
            short_size(self.block_size),
            self.iodepth,
            self.queues
        )
    }

    fn chart_label(&self) -> String {
        format!(
            "{} {}\nQD{} {}q",
            self.pattern.name(),
            short_size(self.block_size),
            self.iodepth,
            self.queues
        )
    }

    fn random_qd32(&self) -> bool {
        self.pattern.random() && self.block_size == 4096 && self.iodepth == 32
    }

    fn sequential(&self) -> bool {
        !self.pattern.random()
    }
}

fn short_size(bs: u32) -> String {
    if bs % (1 << 20) == 0 {
        format!("{}M", bs >> 20)
    } else {
        format!("{}K", bs >> 10)
    }
}

/// The cells: 4 KiB random reads and writes at QD 1 and 32 on 1 and 2 queues, and 1 MiB
/// sequential reads and writes at QD 8 on one queue.
pub fn cells() -> Vec<Cell> {
    let mut v = Vec::new();
    for pattern in [Pattern::RandRead, Pattern::RandWrite] {
        for queues in [1, 2] {
            for iodepth in [1, 32] {
                v.push(Cell {
                    pattern,
                    block_size: 4096,
                    iodepth,
                    queues,
                });
            }
        }
    }
    for pattern in [Pattern::Read, Pattern::Write] {
        v.push(Cell {
            pattern,
            block_size: 1 << 20,
            iodepth: 8,
            queues: 1,
        });
    }
    v
}

/// The systems measured, in the order they run within a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    FioDirect,
    FioBuffered,
    Qsd,
    Dovetail,
}

impl System {
    pub const ALL: [System; 4] = [
        System::FioDirect,
        System::FioBuffered,
        System::Qsd,
        System::Dovetail,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::FioDirect => "host fio (direct)",
            System::FioBuffered => "host fio (buffered)",
            System::Qsd => "qemu-storage-daemon",
            System::Dovetail => "dovetail",
        }
    }

    fn color(self) -> (u8, u8, u8) {
        match self {
            System::FioDirect => (160, 160, 160),
            System::FioBuffered => (90, 90, 90),
            System::Qsd => (214, 120, 30),
            System::Dovetail => (30, 110, 200),
        }
    }
}

/// One system's figures for one cell.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    pub iops: f64,
    pub mb_per_s: f64,
    /// Microseconds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// The load generator's CPU use in % of one core (vhost-user systems only).
    pub generator_cpu: Option<f64>,
    /// The backend daemon's CPU use in % of one core (vhost-user systems only).
    pub backend_cpu: Option<f64>,
    pub io_errors: u64,
}

/// The outcome of the generator-overhead experiment on one backend.
#[derive(Debug, Clone, Copy)]
pub struct Overhead {
    pub system: System,
    pub cell: Cell,
    /// Whether the generator polled the used ring (else it slept on the call eventfd).
    pub poll: bool,
    pub measured: Measured,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct Results {
    pub cells: Vec<Cell>,
    /// `figures[cell][system]`, systems in [`System::ALL`] order.
    pub figures: Vec<Vec<Measured>>,
    pub overhead: Vec<Overhead>,
    pub runtime: Duration,
    pub dovetail: PathBuf,
    /// The layout and Tee sections (see [`crate::layouts`]).
    pub layouts: Vec<crate::layouts::SectionResult>,
    /// The live-reconfiguration section (see [`crate::pause`]).
    pub pause: Option<crate::pause::PauseResult>,
}

/// A daemon started for one cell; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub(crate) struct Daemon {
    child: Child,
}

impl Daemon {
    pub(crate) fn spawn(
        name: &'static str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
        cpu: Option<usize>,
    ) -> Result<Daemon, CompareError> {
        let _ = std::fs::remove_file(socket);
        let log_file = File::create(log).map_err(io(format!("create {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(io(format!("open {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(log_file).stderr(log_err);
        if let Some(cpu) = cpu {
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // sched_setaffinity, which is async-signal-safe, on stack data.
            unsafe {
                cmd.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(io(format!("start {name}")))?;
        let mut daemon = Daemon { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline || matches!(daemon.child.try_wait(), Ok(Some(_))) {
                daemon.stop();
                return Err(CompareError::NoSocket(name, log.to_path_buf()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill only sends a signal; `pid` is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds dovetail in release mode from `workspace` and returns the binary's path.
pub fn build_dovetail(workspace: &Path) -> Result<PathBuf, CompareError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "dovetail-backend",
            "--bin",
            "dovetail",
        ])
        .current_dir(workspace)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io("run cargo build"))?;
    if !out.status.success() {
        return Err(CompareError::Tool {
            tool: "cargo build --release -p dovetail-backend".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    };
    Ok(target.join("release").join("dovetail"))
}

/// Writes `size` bytes of pseudo-random data to `path` (so no block is sparse or
/// compressible) and fsyncs it.
pub fn prepare_image(path: &Path, size: u64) -> Result<(), CompareError> {
    let what = || format!("write the backing file {}", path.display());
    let mut f = File::create(path).map_err(io(what()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(chunk.len() as u64) as usize;
        fill_pattern(done, &mut chunk[..n]);
        f.write_all(&chunk[..n]).map_err(io(what()))?;
        done += n as u64;
    }
    f.sync_all().map_err(io(what()))
}

/// fsyncs every regular file directly in `dir`.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CompareError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))?;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            sync_file(&e.path())?;
        }
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<(), CompareError> {
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("fsync {}", path.display())))
}

/// Runs one cell through the load generator against a vhost-user socket.
pub(crate) fn run_vhost(
    system: System,
    socket: &Path,
    backend_pid: u32,
    cell: &Cell,
    duration: Duration,
    cpus: Vec<usize>,
    poll: bool,
) -> Result<Measured, CompareError> {
    let w = Workload {
        pattern: cell.pattern,
        block_size: cell.block_size,
        iodepth: cell.iodepth,
        queues: cell.queues,
        limit: load::Limit::Time(duration),
        cpus,
        poll,
        ..Workload::new(cell.pattern)
    };
    let load_err = |source| CompareError::Load {
        system: system.name(),
        cell: cell.label(),
        source,
    };
    let (driver, device) = load::connect(socket, &w).map_err(load_err)?;
    let before = crate::procstat::process_cpu_checked(backend_pid);
    let report = load::run(&driver, &device, &w, None).map_err(load_err)?;
    let after = crate::procstat::process_cpu_checked(backend_pid);
    drop(driver);
    let lat = report.latency_us();
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    Ok(Measured {
        iops: report.iops(),
        mb_per_s: report.mb_per_s(),
        p50: lat.p50,
        p99: lat.p99,
        p999: lat.p999,
        generator_cpu: Some(report.cpu_percent()),
        backend_cpu: before.zip(after).map(|(b, a)| 100.0 * (a - b) / secs),
        io_errors: report.io_errors,
    })
}

fn start_backend(
    system: System,
    opts: &CompareOptions,
    dovetail: &Path,
    image: &Path,
    queues: usize,
    cpu: Option<usize>,
) -> Result<(Daemon, PathBuf), CompareError> {
    let dir = &opts.dir;
    match system {
        System::Qsd => {
            let socket = dir.join("qsd.sock");
            let mut cmd = Command::new(&opts.qsd);
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={},cache.direct=off",
                    image.display()
                ))
                .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
                .arg(format!(
                    "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,\
                     writable=on,num-queues={queues}",
                    socket.display()
                ));
            let d = Daemon::spawn(
                "qemu-storage-daemon",
                cmd,
                &socket,
                &dir.join("qsd.log"),
                cpu,
            )?;
            Ok((d, socket))
        }
        _ => {
            let socket = dir.join("dovetail.sock");
            let mut cmd = Command::new(dovetail);
            cmd.arg("serve")
                .arg("--image")
                .arg(image)
                .arg("--socket")
                .arg(&socket)
                .arg("--queues")
                .arg(queues.to_string());
            let d = Daemon::spawn("dovetail", cmd, &socket, &dir.join("dovetail.log"), cpu)?;
            Ok((d, socket))
        }
    }
}

/// Runs one cell with host fio on the backing file.
fn run_fio(
    opts: &CompareOptions,
    image: &Path,
    cell: &Cell,
    direct: bool,
) -> Result<Measured, CompareError> {
    let json = fio_cell(
        &opts.fio,
        image,
        cell,
        opts.size,
        opts.duration,
        &[
            &format!("--direct={}", u8::from(direct)),
            "--ioengine=libaio",
        ],
    )?;
    parse_fio(&json, cell.pattern.writes())
}

/// Runs `fio` for one cell on `image` (`engine`: the engine and direct-I/O options) and
/// returns its JSON report.
pub(crate) fn fio_cell(
    fio: &Path,
    image: &Path,
    cell: &Cell,
    size: u64,
    duration: Duration,
    engine: &[&str],
) -> Result<String, CompareError> {
    let out = Command::new(fio)
        .arg("--name=cell")
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--rw={}", cell.pattern.name()))
        .arg(format!("--bs={}", cell.block_size))
        .arg(format!("--iodepth={}", cell.iodepth))
        .arg(format!("--numjobs={}", cell.queues))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={}ms", duration.as_millis()))
        .args(engine)
        .args([
            "--time_based",
            "--group_reporting",
            "--norandommap",
            "--randrepeat=0",
            "--invalidate=0",
            "--lat_percentiles=1",
            "--percentile_list=50:99:99.9",
            "--output-format=json",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(io("run fio"))?;
    if !out.status.success() {
        return Err(CompareError::Tool {
            tool: "fio".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    text.find('{')
        .map(|i| text[i..].to_string())
        .ok_or_else(|| CompareError::FioOutput("no JSON in fio's output".into()))
}

/// Picks IOPS, bandwidth and latency percentiles out of fio's JSON output.
pub fn parse_fio(json: &str, write: bool) -> Result<Measured, CompareError> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| CompareError::FioOutput(e.to_string()))?;
    let side = &v["jobs"][0][if write { "write" } else { "read" }];
    let num = |v: &Value| v.as_f64();
    let iops = num(&side["iops"]).ok_or_else(|| CompareError::FioOutput("no iops".into()))?;
    let bw = num(&side["bw_bytes"]).unwrap_or(0.0);
    let pct = &side["lat_ns"]["percentile"];
    let at = |k: &str| num(&pct[k]).unwrap_or(0.0) / 1000.0;
    Ok(Measured {
        iops,
        mb_per_s: bw / 1e6,
        p50: at("50.000000"),
        p99: at("99.000000"),
        p999: at("99.900000"),
        generator_cpu: None,
        backend_cpu: None,
        io_errors: v["jobs"][0]["error"].as_u64().unwrap_or(0),
    })
}

/// Runs the whole comparison, printing each figure as it is measured.
pub fn run(
    opts: &CompareOptions,
    cells: &[Cell],
    sections: &[crate::layouts::Section],
) -> Result<Results, CompareError> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("create {}", opts.dir.display())))?;
    let dovetail = match &opts.dovetail {
        Some(p) => p.clone(),
        None => {
            eprintln!("building dovetail (release) ...");
            build_dovetail(&opts.workspace)?
        }
    };
    let image = opts.dir.join("compare.img");
    eprintln!(
        "writing the {} backing file {} ...",
        format_size(opts.size),
        image.display()
    );
    prepare_image(&image, opts.size)?;

    let mut figures = Vec::with_capacity(cells.len());
    for cell in cells {
        let mut row = Vec::with_capacity(System::ALL.len());
        for system in System::ALL {
            sync_file(&image)?;
            let m = match system {
                System::FioDirect => run_fio(opts, &image, cell, true)?,
                System::FioBuffered => run_fio(opts, &image, cell, false)?,
                System::Qsd | System::Dovetail => {
                    let (daemon, socket) =
                        start_backend(system, opts, &dovetail, &image, cell.queues, None)?;
                    let m = run_vhost(
                        system,
                        &socket,
                        daemon.pid(),
                        cell,
                        opts.duration,
                        Vec::new(),
                        false,
                    )?;
                    drop(daemon);
                    m
                }
            };
            eprintln!(
                "{:<24} {:<20} {:>10.0} IOPS {:>9.1} MB/s  p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us{}",
                cell.label(),
                system.name(),
                m.iops,
                m.mb_per_s,
                m.p50,
                m.p99,
                m.p999,
                match (m.generator_cpu, m.backend_cpu) {
                    (Some(g), Some(b)) => format!("  CPU: generator {g:.0}%, backend {b:.0}%"),
                    _ => String::new(),
                }
            );
            row.push(m);
        }
        let (d, q, l) = (row[3].iops, row[2].iops, row[1].iops);
        eprintln!(
            "{:<24} dovetail/qsd {:.2}  dovetail/limit {:.2}",
            cell.label(),
            ratio(d, q),
            ratio(d, l)
        );
        figures.push(row);
    }

    let mut overhead = Vec::new();
    if opts.overhead && cpu_count() >= 2 {
        // The generator on CPU 0, the backend on CPU 1: if the backend's core is busy while the
        // generator's is not, one generator core is enough to saturate the backend.
        let cell = Cell {
            pattern: Pattern::RandRead,
            block_size: 4096,
            iodepth: 32,
            queues: 1,
        };
        for (system, poll) in [
            (System::Qsd, false),
            (System::Qsd, true),
            (System::Dovetail, false),
        ] {
            sync_file(&image)?;
            let (daemon, socket) = start_backend(system, opts, &dovetail, &image, 1, Some(1))?;
            let m = run_vhost(
                system,
                &socket,
                daemon.pid(),
                &cell,
                opts.duration,
                vec![0],
                poll,
            )?;
            drop(daemon);
            eprintln!(
                "overhead: {} pinned to CPU 1, generator ({}) to CPU 0: {:.0} IOPS, generator \
                 {:.0}% of its core, backend {:.0}%",
                system.name(),
                if poll { "polling" } else { "eventfd" },
                m.iops,
                m.generator_cpu.unwrap_or(0.0),
                m.backend_cpu.unwrap_or(0.0)
            );
            overhead.push(Overhead {
                system,
                cell,
                poll,
                measured: m,
            });
        }
    }
    let layouts = crate::layouts::run_sections(opts, &dovetail, &image, sections)?;
    let _ = std::fs::remove_file(&image);
    let pause = if opts.pause {
        let p = crate::pause::PauseOptions {
            size: opts.size,
            // 20 s per phase at the default 5 s per cell.
            duration: opts.duration * 4,
            ..crate::pause::PauseOptions::new(dovetail.clone(), opts.dir.clone())
        };
        Some(crate::pause::run(&p)?)
    } else {
        None
    };
    Ok(Results {
        cells: cells.to_vec(),
        figures,
        overhead,
        runtime: started.elapsed(),
        dovetail,
        layouts,
        pause,
    })
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Facts about the machine for the write-up.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub filesystem: String,
    pub os: String,
    pub qsd_version: String,
    pub fio_version: String,
    pub revision: String,
}

/// Looks the machine up.
pub fn machine(opts: &CompareOptions) -> Machine {
    machine_of(&opts.workspace, &opts.dir, Some((&opts.qsd, &opts.fio)))
}

/// Looks the machine up: the workspace's revision, the filesystem holding `dir`, and the
/// versions of qemu-storage-daemon and fio when `tools` names them (else left empty).
pub fn machine_of(workspace: &Path, dir: &Path, tools: Option<(&Path, &Path)>) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_string());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / (1 << 20) as f64)
        });
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or(String::new(), |s| s.trim_matches('"').to_string());
    let first_line = |cmd: &Path, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "unknown".into())
    };
    let revision = {
        let rev = first_line(
            Path::new("git"),
            &[
                "-C",
                &workspace.to_string_lossy(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        );
        let dirty = Command::new("git")
            .args([
                "-C",
                &workspace.to_string_lossy(),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                // The files this command writes do not make the measured code dirty.
                ":(exclude)BENCHMARKS.md",
                ":(exclude)bench/benchmarks.png",
            ])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            format!("{rev} (with uncommitted changes)")
        } else {
            rev
        }
    };
    Machine {
        nproc: cpu_count(),
        cpu_model,
        memory,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        filesystem: filesystem_of(dir),
        os,
        qsd_version: tools.map_or(String::new(), |(qsd, _)| first_line(qsd, &["--version"])),
        fio_version: tools.map_or(String::new(), |(_, fio)| first_line(fio, &["--version"])),
        revision,
    }
}

/// The filesystem type and device of the mount holding `dir`.
fn filesystem_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2], f[0], f[1]))
        })
        .max_by_key(|m| m.0)
        .map_or("unknown".into(), |(_, fs, dev, at)| {
            format!("{fs} on {dev} (mounted at {at})")
        })
}

/// A UTC timestamp like `2025-01-31 12:34 UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

/// Draws the chart of IOPS per cell and system.
pub fn draw_chart(results: &Results, path: &Path) -> Result<(), CompareError> {
    let categories: Vec<String> = results.cells.iter().map(Cell::chart_label).collect();
    let series: Vec<Series> = System::ALL
        .iter()
        .enumerate()
        .map(|(si, s)| Series {
            name: s.name().to_string(),
            color: s.color(),
            values: results
                .figures
                .iter()
                .map(|row| Some(row[si].iops))
                .collect(),
        })
        .collect();
    bar_chart(
        path,
        "IOPS per workload (higher is better; log scale)",
        "IOPS",
        &categories,
        &series,
    )?;
    Ok(())
}

pub(crate) fn fmt_iops(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The write-up, as Markdown. `chart_link` is the chart's path relative to the Markdown file.
pub fn markdown(
    results: &Results,
    machine: &Machine,
    opts: &CompareOptions,
    chart_link: &str,
) -> String {
    let mut s = String::new();
    let secs = opts.duration.as_secs_f64();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `dovetail-bench compare` on {}; every figure below comes from that one run \
         ({:.0} s in all). Regenerate with:\n\n```\n{}\n```\n",
        utc_now(),
        results.runtime.as_secs_f64(),
        opts.command
    );
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "| | |\n| --- | --- |");
    for (k, v) in [
        ("CPUs (nproc)", machine.nproc.to_string()),
        ("CPU model", machine.cpu_model.clone()),
        ("memory", machine.memory.clone()),
        ("OS", machine.os.clone()),
        ("kernel", machine.kernel.clone()),
        ("filesystem of the backing file", machine.filesystem.clone()),
        ("qemu-storage-daemon", machine.qsd_version.clone()),
        ("fio", machine.fio_version.clone()),
        ("dovetail revision", machine.revision.clone()),
    ] {
        let _ = writeln!(s, "| {k} | {v} |");
    }

    let _ = writeln!(s, "\n## Method\n");
    let _ = writeln!(
        s,
        "- **One backing file** of {size} in `{dir}`, written in full with pseudo-random data and \
         fsynced before the first cell (no sparse or zero blocks anywhere), shared by every \
         system. It stays in the page cache throughout ({mem} of RAM).\n\
         - **Systems.** *host fio (direct)*: fio on the file with `--direct=1 --ioengine=libaio`, \
         the device's physical limit. *host fio (buffered)*: the same with `--direct=0`, which is \
         the limit for the two daemons, since both go through the page cache; ratios \
         \"dovetail/limit\" are against this one. *qemu-storage-daemon*: `--blockdev \
         driver=file,node-name=f0,filename=IMG,cache.direct=off --blockdev \
         driver=raw,node-name=d0,file=f0 --export type=vhost-user-blk,...,writable=on,num-queues=N` \
         (its defaults otherwise: `aio=threads`). *dovetail*: `{dovetail} serve --image IMG \
         --socket SOCK --queues N` (raw layout, release build, one worker thread per queue, \
         positional I/O through the page cache).\n\
         - **Fairness.** Both daemons use buffered I/O on the same file, get the same number of \
         queues as the workload uses, and are driven by the same load generator \
         (`dovetail-bench`, in this process) with the same settings: EVENT_IDX, completions by \
         the call eventfd, one thread per queue, {secs:.0} s per cell. No FLUSH is sent, so \
         neither pays for fdatasync. Each daemon is started fresh for its cell and stopped after \
         it; cells run system after system, and the file is fsynced before every measurement so \
         no write cell leaves dirty pages to the next. fio uses `--invalidate=0` so its buffered \
         runs see the same warm cache, and `--lat_percentiles=1` so its latencies, like the \
         generator's, run from submission to completion.\n\
         - **Cells.** 4 KiB random reads and writes at queue depth 1 and 32 per queue, on 1 and 2 \
         queues (fio: `--numjobs` = queues), and 1 MiB sequential reads and writes at queue depth \
         8 on one queue. IOPS and MB/s (10^6 bytes/s) are totals over all queues.\n\
         - **Reading the limit.** On a buffered file libaio's io_submit completes each request \
         before returning, so buffered fio copies one request at a time per job whatever \
         `--iodepth` says. At queue depth 1 it is a bare copy from the page cache, which no path \
         with a vhost-user round trip (a kick and a call, two wake-ups) can approach; and a \
         backend that spreads one queue's requests over several threads (qemu-storage-daemon's \
         `aio=threads` pool) can beat it on the 1 MiB cells.",
        size = format_size(opts.size),
        dir = opts.dir.display(),
        mem = machine.memory,
        dovetail = results
            .dovetail
            .file_name()
            .map_or("dovetail".into(), |n| n.to_string_lossy().into_owned()),
    );

    let _ = writeln!(s, "\n## Throughput\n");
    let _ = writeln!(
        s,
        "| cell | fio direct | fio buffered (limit) | qemu-storage-daemon | dovetail | dovetail/qsd | dovetail/limit | dovetail/fio direct |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (cell, row) in results.cells.iter().zip(&results.figures) {
        let show = |m: &Measured| {
            if cell.block_size >= 1 << 20 {
                format!("{:.0} MB/s", m.mb_per_s)
            } else {
                format!("{} IOPS", fmt_iops(m.iops))
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            cell.label(),
            show(&row[0]),
            show(&row[1]),
            show(&row[2]),
            show(&row[3]),
            ratio(row[3].iops, row[2].iops),
            ratio(row[3].iops, row[1].iops),
            ratio(row[3].iops, row[0].iops)
        );
    }
    let _ = writeln!(s, "\n![IOPS per cell and system]({chart_link})\n");

    let _ = writeln!(s, "## Latency (µs: p50 / p99 / p99.9)\n");
    let _ = writeln!(
        s,
        "| cell | fio direct | fio buffered | qemu-storage-daemon | dovetail |\n| --- | --- | --- | --- | --- |"
    );
    for (cell, row) in results.cells.iter().zip(&results.figures) {
        let l = |m: &Measured| format!("{:.1} / {:.1} / {:.1}", m.p50, m.p99, m.p999);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            cell.label(),
            l(&row[0]),
            l(&row[1]),
            l(&row[2]),
            l(&row[3])
        );
    }

    let _ = writeln!(s, "\n## CPU (% of one core, over each cell)\n");
    let _ = writeln!(
        s,
        "| cell | generator vs qsd | qemu-storage-daemon | generator vs dovetail | dovetail | qsd CPU µs/op | dovetail CPU µs/op |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (cell, row) in results.cells.iter().zip(&results.figures) {
        let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}%"));
        let per_op = |m: &Measured| {
            m.backend_cpu.map_or("-".into(), |c| {
                format!("{:.1}", c / 100.0 / m.iops.max(1e-9) * 1e6)
            })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            cell.label(),
            pct(row[2].generator_cpu),
            pct(row[2].backend_cpu),
            pct(row[3].generator_cpu),
            pct(row[3].backend_cpu),
            per_op(&row[2]),
            per_op(&row[3])
        );
    }

    let _ = writeln!(s, "\n## Targets\n");
    let mut random = Vec::new();
    let mut seq = Vec::new();
    let mut limit = Vec::new();
    for (cell, row) in results.cells.iter().zip(&results.figures) {
        let vs_qsd = ratio(row[3].iops, row[2].iops);
        let vs_limit = ratio(row[3].iops, row[1].iops);
        if cell.random_qd32() {
            random.push((cell.label(), vs_qsd));
        }
        if cell.sequential() {
            seq.push((cell.label(), vs_qsd));
        }
        limit.push((cell.label(), vs_limit));
    }
    let list = |v: &[(String, f64)], min: f64| {
        v.iter()
            .map(|(l, r)| format!("{l} {r:.3}×{}", if *r >= min { "" } else { " ✗" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all = |v: &[(String, f64)], min: f64| v.iter().all(|(_, r)| *r >= min);
    let _ = writeln!(
        s,
        "| target | result | cells |\n| --- | --- | --- |\n\
         | ≥ 1.2× qemu-storage-daemon IOPS, 4 KiB random QD32 | {} | {} |\n\
         | ≥ 1.0× qemu-storage-daemon, 1 MiB sequential | {} | {} |\n\
         | ≥ 0.8× host fio (buffered, the same caching as the daemons), every cell | {} | {} |",
        verdict(all(&random, 1.2)),
        list(&random, 1.2),
        verdict(all(&seq, 1.0)),
        list(&seq, 1.0),
        verdict(all(&limit, 0.8)),
        list(&limit, 0.8),
    );

    let _ = writeln!(s, "{}", WHAT_BOUNDS);
    s.push_str(&crate::layouts::markdown(results));
    if let Some(p) = &results.pause {
        s.push_str(&crate::pause::section(
            p,
            machine,
            crate::pause::Provenance::Compare,
        ));
    }

    let _ = writeln!(s, "\n## Load generator overhead\n");
    if results.overhead.is_empty() {
        let _ = writeln!(s, "Not measured in this run (it needs two CPUs).");
    } else {
        let _ = writeln!(
            s,
            "Can one core of the generator saturate a backend? Each backend (all its threads) \
             was pinned to CPU 1 and the generator's queue thread to CPU 0, and ran 4 KiB random \
             reads at QD32 on one queue for {secs:.0} s, with completions taken from the call \
             eventfd (as in every cell above) or by polling the used ring. CPU time comes from \
             getrusage (RUSAGE_THREAD) for the generator and /proc/PID/stat (utime + stime, all \
             threads) for the backend.\n\n\
             | backend | generator waits by | IOPS | generator CPU (CPU 0) | backend CPU (CPU 1) | generator µs/op | backend µs/op |\n\
             | --- | --- | ---: | ---: | ---: | ---: | ---: |"
        );
        let per_op = |pct: f64, iops: f64| pct / 100.0 / iops.max(1e-9) * 1e6;
        for o in &results.overhead {
            let m = &o.measured;
            let g = m.generator_cpu.unwrap_or(0.0);
            let b = m.backend_cpu.unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {g:.0}% | {b:.0}% | {:.2} | {:.2} |",
                o.system.name(),
                if o.poll { "polling" } else { "eventfd" },
                fmt_iops(m.iops),
                per_op(g, m.iops),
                per_op(b, m.iops),
            );
        }
        let find = |poll: bool| {
            results
                .overhead
                .iter()
                .find(|o| o.system == System::Qsd && o.poll == poll)
                .map(|o| {
                    let m = o.measured;
                    (
                        m.iops,
                        m.generator_cpu.unwrap_or(0.0),
                        m.backend_cpu.unwrap_or(0.0),
                    )
                })
        };
        let _ = writeln!(s);
        if let Some((iops, g, b)) = find(false) {
            let (gu, bu) = (per_op(g, iops), per_op(b, iops));
            let _ = writeln!(
                s,
                "- Per request the generator spends {gu:.2} µs of CPU, qemu-storage-daemon \
                 {bu:.2} µs ({:.0}× more). Waiting on the eventfd, the generator's core was {g:.0}% \
                 busy and qemu-storage-daemon's {b:.0}%: {}",
                bu / gu.max(1e-9),
                if b >= 90.0 {
                    "the backend's core is the bottleneck."
                } else {
                    "neither core is saturated; both sides sleep between batches of completions, \
                     so at a fixed queue depth the rate is bounded by wake-up round trips (the \
                     same generator, and so the same bound, for every backend in the tables)."
                }
            );
        }
        if let Some((iops, g, b)) = find(true) {
            let _ = writeln!(
                s,
                "- Polling, the generator keeps its core busy by design ({g:.0}%, nearly all of \
                 it spinning) and answers every completion at once; qemu-storage-daemon's core \
                 was then {b:.0}% busy at {} IOPS. {}",
                fmt_iops(iops),
                if b >= 90.0 {
                    "**One generator core saturates qemu-storage-daemon.**"
                } else {
                    "qemu-storage-daemon did not reach a full core: something other than CPU \
                     (its thread pool hand-offs) bounds it."
                }
            );
        }
    }
    s
}

/// Runs the comparison and writes the Markdown and the chart.
pub fn compare(opts: &CompareOptions) -> Result<Results, CompareError> {
    let results = run(opts, &cells(), &crate::layouts::sections())?;
    if let Some(parent) = opts.chart.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    draw_chart(&results, &opts.chart)?;
    let machine = machine(opts);
    let link = relative_link(&opts.out, &opts.chart);
    let md = markdown(&results, &machine, opts, &link);
    std::fs::write(&opts.out, md).map_err(io(format!("write {}", opts.out.display())))?;
    Ok(results)
}

/// `to` relative to the directory holding `from`, for a Markdown link (falls back to `to`).
fn relative_link(from: &Path, to: &Path) -> String {
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().map_or(p.to_path_buf(), |d| d.join(p))
        }
    };
    let base = abs(from)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let to = abs(to);
    let b: Vec<_> = base.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel.to_string_lossy().into_owned()
}

/// How dovetail's data path is built and what limits the cells it does not win; true of any run
/// of this command on a machine of this kind (the figures themselves are in the tables).
const WHAT_BOUNDS: &str = "
### What bounds each kind of cell

- **dovetail's data path.** One worker thread per queue completes requests in order. Data moves
  with `preadv`/`pwritev` straight between the page cache and guest memory: dovetail copies
  nothing itself. Reads of 256 KiB or more are split in two, and the queue's helper thread moves
  one half, so a single queue's large reads use two cores. The request still completes only once,
  after both halves.
- **1 MiB sequential writes** are bounded by the kernel, not by either daemon. Buffered writes to
  one file take the file's inode lock (ext4, xfs and block devices alike), so only one copy into
  the page cache runs at a time, however many threads submit. qemu-storage-daemon's thread pool
  and dovetail's single worker both run into that lock, so their throughput is about equal. The
  CPU table shows what each spends per request. Splitting writes across threads was measured and
  only added contention, so writes are not split.
- **Queue depth 1 against buffered fio.** At QD1, buffered fio is a bare `pread`/`pwrite` from the
  page cache. A vhost-user request also needs a kick and a call, which are two thread wake-ups
  across processes, so no vhost-user backend can come close. Against direct-I/O fio, and at QD32,
  dovetail is at or above the limit.";

/// qemu-storage-daemon serving each `(file, socket)` of `exports` as its own vhost-user-blk
/// export with `queues` queues, on direct I/O (`cache.direct=on`, `aio=io_uring`) and an
/// iothread of its own per export.
pub(crate) fn qsd_direct_exports(
    qsd: &Path,
    exports: &[(PathBuf, PathBuf)],
    queues: usize,
) -> Command {
    let mut cmd = Command::new(qsd);
    for (i, (file, socket)) in exports.iter().enumerate() {
        cmd.arg("--object")
            .arg(format!("iothread,id=io{i}"))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f{i},filename={},cache.direct=on,aio=io_uring",
                file.display()
            ))
            .arg("--blockdev")
            .arg(format!("driver=raw,node-name=d{i},file=f{i}"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e{i},addr.type=unix,addr.path={},node-name=d{i},\
                 writable=on,num-queues={queues},iothread=io{i}",
                socket.display()
            ));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_is_read() {
        let json = r#"{"jobs":[{"error":0,"read":{"iops":1234.5,"bw_bytes":5056512,
            "lat_ns":{"percentile":{"50.000000":20000,"99.000000":50000,"99.900000":90000}}},
            "write":{"iops":0,"bw_bytes":0}}]}"#;
        let m = parse_fio(json, false).expect("parses");
        assert_eq!(m.iops, 1234.5);
        assert!((m.mb_per_s - 5.056512).abs() < 1e-9);
        assert_eq!((m.p50, m.p99, m.p999), (20.0, 50.0, 90.0));
    }

    #[test]
    fn links_are_relative_to_the_markdown_file() {
        assert_eq!(
            relative_link(Path::new("/w/BENCHMARKS.md"), Path::new("/w/bench/c.png")),
            "bench/c.png"
        );
        assert_eq!(
            relative_link(Path::new("/w/docs/B.md"), Path::new("/w/bench/c.png")),
            "../bench/c.png"
        );
    }

    #[test]
    fn dates_are_civil() {
        let s = utc_now();
        assert!(s.ends_with(" UTC") && s.len() == 20, "{s}");
    }
}
