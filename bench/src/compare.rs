//! What every benchmark of `dovetail-bench` is built from: the workload cells, the systems
//! measured (host fio, qemu-storage-daemon, dovetail), the daemons started for a cell, fio and
//! the load generator's runs, and the machine's description. The `compare` command itself (every
//! cell on every system, written up as BENCHMARKS.md with a chart) is [`crate::comparison`].

use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::chart::ChartError;
use crate::fill::fill_pattern;
use crate::load::{self, LoadError, Pattern, Workload};

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

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
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

    pub(crate) fn chart_label(&self) -> String {
        format!(
            "{} {}\nQD{} {}q",
            self.pattern.name(),
            short_size(self.block_size),
            self.iodepth,
            self.queues
        )
    }

    pub(crate) fn random_qd32(&self) -> bool {
        self.pattern.random() && self.block_size == 4096 && self.iodepth == 32
    }

    pub(crate) fn sequential(&self) -> bool {
        !self.pattern.random()
    }
}

pub(crate) fn short_size(bs: u32) -> String {
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

    pub(crate) fn color(self) -> (u8, u8, u8) {
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

pub(crate) fn sync_file(path: &Path) -> Result<(), CompareError> {
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

pub(crate) fn start_backend(
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
pub(crate) fn run_fio(
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

pub(crate) fn cpu_count() -> usize {
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
pub(crate) fn filesystem_of(dir: &Path) -> String {
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

pub(crate) fn fmt_iops(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

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
    fn dates_are_civil() {
        let s = utc_now();
        assert!(s.ends_with(" UTC") && s.len() == 20, "{s}");
    }
}
