//! `dovetail-bench direct`: the comparison's cells on direct I/O, with the host page cache
//! dropped before every run: dovetail `--cache none` (O_DIRECT, io_uring) against
//! qemu-storage-daemon in its strongest configuration (`cache.direct=on`, `aio=io_uring` and
//! `aio=native`, an iothread) and host fio `--direct=1 --ioengine=io_uring` (the device's
//! limit), each with its CPU time per request.
//!
//! Same cells as `compare` (4 KiB random reads and writes at QD 1 and 32 on 1 and 2 queues, 1 MiB
//! sequential reads and writes at QD 8), same load generator, same backing file, run cell-major
//! so every system sees the same device state. The 4 KiB random read cells also run a
//! parallax-v1 disk of a store holding the same bytes (`disk import`), served with
//! `serve --store --cache none`: the store layout's price on direct I/O against the raw image. Before each run the file is fsynced and the page
//! cache dropped (`/proc/sys/vm/drop_caches`, root only; the write-up says when it could not).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::compare::{
    cells, parse_fio, prepare_image, ratio, run_vhost, Cell, CompareError, Daemon, Machine,
    Measured, System,
};

/// Marker comments around the section in BENCHMARKS.md.
pub const BEGIN: &str = "<!-- dovetail-bench direct: begin -->";
pub const END: &str = "<!-- dovetail-bench direct: end -->";
/// The section's title.
pub const TITLE: &str = "Direct I/O: the page cache dropped, dovetail --cache none";

/// The systems of the direct cells, in the order they run within a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DirectSystem {
    /// Host fio, `--direct=1 --ioengine=io_uring`: the limit.
    Fio,
    /// qemu-storage-daemon, `cache.direct=on,aio=io_uring`, an iothread.
    QsdUring,
    /// qemu-storage-daemon, `cache.direct=on,aio=native`, an iothread.
    QsdNative,
    /// dovetail `serve --cache none` (io_uring).
    Dovetail,
    /// dovetail `serve --store --cache none`, a parallax-v1 disk holding the backing file's
    /// bytes (4 KiB random cells only).
    DovetailParallax,
    /// The same store's parallax-v2 disk holding the same bytes (4 KiB random cells only).
    DovetailParallaxV2,
}

impl DirectSystem {
    pub const ALL: [DirectSystem; 6] = [
        DirectSystem::Fio,
        DirectSystem::QsdUring,
        DirectSystem::QsdNative,
        DirectSystem::Dovetail,
        DirectSystem::DovetailParallax,
        DirectSystem::DovetailParallaxV2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DirectSystem::Fio => "fio io_uring direct",
            DirectSystem::QsdUring => "qsd aio=io_uring",
            DirectSystem::QsdNative => "qsd aio=native",
            DirectSystem::Dovetail => "dovetail --cache none",
            DirectSystem::DovetailParallax => "dovetail parallax-v1 --cache none",
            DirectSystem::DovetailParallaxV2 => "dovetail parallax-v2 --cache none",
        }
    }

    /// Whether this system runs `cell` (the store's disks: 4 KiB random cells only).
    pub fn runs(self, cell: &Cell) -> bool {
        !self.parallax() || parallax_cell(cell)
    }

    /// One of the store's parallax disks.
    fn parallax(self) -> bool {
        matches!(
            self,
            DirectSystem::DovetailParallax | DirectSystem::DovetailParallaxV2
        )
    }
}

/// The cells the store's parallax disks run: 4 KiB random reads and writes.
fn parallax_cell(cell: &Cell) -> bool {
    matches!(
        cell.pattern,
        crate::load::Pattern::RandRead | crate::load::Pattern::RandWrite
    ) && cell.block_size == 4096
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DirectOptions {
    pub dir: PathBuf,
    pub size: u64,
    pub duration: Duration,
    pub dovetail: PathBuf,
    pub qsd: PathBuf,
    pub fio: PathBuf,
    /// Only these cells (all of `compare::cells()` when empty).
    pub cells: Vec<Cell>,
}

/// One system's figures in one cell.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Figure {
    pub system: DirectSystem,
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU time of the backend (fio: of fio itself) per request, µs.
    pub cpu_us_per_req: f64,
    pub io_errors: u64,
}

/// One cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub cell: String,
    pub qd32: bool,
    pub qd1: bool,
    pub figures: Vec<Figure>,
}

impl Row {
    fn get(&self, s: DirectSystem) -> Option<&Figure> {
        self.figures.iter().find(|f| f.system == s)
    }

    /// The better of the two qemu-storage-daemon configurations.
    pub fn best_qsd(&self) -> Option<&Figure> {
        let (a, b) = (
            self.get(DirectSystem::QsdUring)?,
            self.get(DirectSystem::QsdNative)?,
        );
        Some(if a.iops >= b.iops { a } else { b })
    }

    pub fn vs_qsd(&self) -> f64 {
        match (self.get(DirectSystem::Dovetail), self.best_qsd()) {
            (Some(d), Some(q)) => ratio(d.iops, q.iops),
            _ => 0.0,
        }
    }

    /// The parallax-v1 store disk against the raw image (0 where it did not run).
    pub fn parallax_vs_raw(&self) -> f64 {
        self.store_vs_raw(DirectSystem::DovetailParallax)
    }

    /// One of the store's disks (`system`) against the raw image (0 where it did not run).
    pub fn store_vs_raw(&self, system: DirectSystem) -> f64 {
        match (self.get(system), self.get(DirectSystem::Dovetail)) {
            (Some(p), Some(r)) => ratio(p.iops, r.iops),
            _ => 0.0,
        }
    }

    pub fn vs_fio(&self) -> f64 {
        match (
            self.get(DirectSystem::Dovetail),
            self.get(DirectSystem::Fio),
        ) {
            (Some(d), Some(f)) => ratio(d.iops, f.iops),
            _ => 0.0,
        }
    }
}

/// Everything measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirectResult {
    pub rows: Vec<Row>,
    /// Whether the page cache could be dropped before every run.
    pub dropped_caches: bool,
    pub size: u64,
    pub seconds: f64,
    pub runtime_secs: f64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

/// fsyncs `image` and drops the page cache; `false` if the cache could not be dropped.
fn sync_and_drop(image: &Path) -> Result<bool, CompareError> {
    std::fs::File::options()
        .write(true)
        .open(image)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("fsync {}", image.display())))?;
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    Ok(std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok())
}

fn fio_direct(o: &DirectOptions, image: &Path, cell: &Cell) -> Result<Figure, CompareError> {
    let json = crate::compare::fio_cell(
        &o.fio,
        image,
        cell,
        o.size,
        o.duration,
        &["--direct=1", "--ioengine=io_uring"],
    )?;
    let json = json.as_str();
    let m = parse_fio(json, cell.pattern.writes())?;
    // usr_cpu/sys_cpu: % of the run's time, per job (group_reporting averages them).
    let v: Value =
        serde_json::from_str(json).map_err(|e| CompareError::FioOutput(e.to_string()))?;
    let job = &v["jobs"][0];
    let cpu = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let cpu_secs = cpu / 100.0 * o.duration.as_secs_f64() * cell.queues as f64;
    let ops = m.iops * o.duration.as_secs_f64();
    Ok(figure(DirectSystem::Fio, &m, cpu_secs * 1e6 / ops.max(1.0)))
}

fn figure(system: DirectSystem, m: &Measured, cpu_us_per_req: f64) -> Figure {
    Figure {
        system,
        iops: m.iops,
        mb_per_s: m.mb_per_s,
        p50_us: m.p50,
        p99_us: m.p99,
        cpu_us_per_req,
        io_errors: m.io_errors,
    }
}

fn start(
    o: &DirectOptions,
    system: DirectSystem,
    image: &Path,
    queues: usize,
) -> Result<(Daemon, PathBuf), CompareError> {
    let dir = &o.dir;
    match system {
        DirectSystem::QsdUring | DirectSystem::QsdNative => {
            let aio = if system == DirectSystem::QsdUring {
                "io_uring"
            } else {
                "native"
            };
            let socket = dir.join("qsd-direct.sock");
            let mut cmd = Command::new(&o.qsd);
            cmd.args(["--object", "iothread,id=io0", "--blockdev"])
                .arg(format!(
                    "driver=file,node-name=f0,filename={},cache.direct=on,aio={aio}",
                    image.display()
                ))
                .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
                .arg(format!(
                    "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,\
                     writable=on,num-queues={queues},iothread=io0",
                    socket.display()
                ));
            let d = Daemon::spawn(
                "qemu-storage-daemon",
                cmd,
                &socket,
                &dir.join("qsd-direct.log"),
                None,
            )?;
            Ok((d, socket))
        }
        DirectSystem::DovetailParallax | DirectSystem::DovetailParallaxV2 => {
            let socket = dir.join("dovetail-parallax.sock");
            let disk = if system == DirectSystem::DovetailParallax {
                "vd"
            } else {
                "vd2"
            };
            let mut cmd = Command::new(&o.dovetail);
            cmd.arg("serve")
                .arg("--store")
                .arg(dir.join("store"))
                .arg("--disk")
                .arg(format!("{disk}={}", socket.display()))
                .arg("--queues")
                .arg(queues.to_string())
                .args(["--cache", "none"]);
            let d = Daemon::spawn(
                "dovetail",
                cmd,
                &socket,
                &dir.join("dovetail-parallax.log"),
                None,
            )?;
            Ok((d, socket))
        }
        _ => {
            let socket = dir.join("dovetail-direct.sock");
            let mut cmd = Command::new(&o.dovetail);
            cmd.arg("serve")
                .arg("--image")
                .arg(image)
                .arg("--socket")
                .arg(&socket)
                .arg("--queues")
                .arg(queues.to_string())
                .args(["--cache", "none"]);
            let d = Daemon::spawn(
                "dovetail",
                cmd,
                &socket,
                &dir.join("dovetail-direct.log"),
                None,
            )?;
            Ok((d, socket))
        }
    }
}

/// Runs `dovetail ARGS`, failing with its output.
fn dovetail_cmd(o: &DirectOptions, args: &[&std::ffi::OsStr]) -> Result<(), CompareError> {
    let out = Command::new(&o.dovetail)
        .args(args)
        .output()
        .map_err(io(format!("run {}", o.dovetail.display())))?;
    if !out.status.success() {
        return Err(CompareError::Tool {
            tool: format!(
                "dovetail {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// A store in `o.dir/store` with a parallax-v1 disk `vd` and a parallax-v2 disk `vd2`, both
/// holding `image`'s bytes.
fn prepare_store(o: &DirectOptions, image: &Path) -> Result<(), CompareError> {
    let store = o.dir.join("store");
    let _ = std::fs::remove_dir_all(&store);
    eprintln!(
        "importing the backing file into a parallax-v1 disk of {} ...",
        store.display()
    );
    // The data of both disks, their trees (about 1/500), v2's checksum pages and room for
    // extents partly used.
    let size = (2 * (o.size + o.size / 8) + (1024 << 20)).to_string();
    let disk = o.size.to_string();
    let s = store.as_os_str();
    dovetail_cmd(
        o,
        &[
            "store".as_ref(),
            "create".as_ref(),
            s,
            "--size".as_ref(),
            size.as_ref(),
        ],
    )?;
    dovetail_cmd(
        o,
        &[
            "disk".as_ref(),
            "create".as_ref(),
            s,
            "vd".as_ref(),
            "--size".as_ref(),
            disk.as_ref(),
        ],
    )?;
    dovetail_cmd(
        o,
        &[
            "disk".as_ref(),
            "import".as_ref(),
            s,
            "vd".as_ref(),
            "--from".as_ref(),
            image.as_os_str(),
        ],
    )?;
    dovetail_cmd(
        o,
        &[
            "disk".as_ref(),
            "create".as_ref(),
            s,
            "vd2".as_ref(),
            "--size".as_ref(),
            disk.as_ref(),
            "--layout".as_ref(),
            "parallax-v2".as_ref(),
        ],
    )?;
    dovetail_cmd(
        o,
        &[
            "disk".as_ref(),
            "import".as_ref(),
            s,
            "vd2".as_ref(),
            "--from".as_ref(),
            image.as_os_str(),
        ],
    )
}

/// Runs every cell on every system.
pub fn run(o: &DirectOptions) -> Result<DirectResult, CompareError> {
    let started = Instant::now();
    std::fs::create_dir_all(&o.dir).map_err(io(format!("create {}", o.dir.display())))?;
    let image = o.dir.join("direct.img");
    eprintln!("writing the backing file {} ...", image.display());
    prepare_image(&image, o.size)?;
    let cells = if o.cells.is_empty() {
        cells()
    } else {
        o.cells.clone()
    };
    if cells.iter().any(parallax_cell) {
        prepare_store(o, &image)?;
    }
    let mut dropped_all = true;
    let mut rows = Vec::new();
    for cell in &cells {
        let mut figures = Vec::new();
        for system in DirectSystem::ALL.into_iter().filter(|s| s.runs(cell)) {
            dropped_all &= sync_and_drop(&image)?;
            let f = match system {
                DirectSystem::Fio => fio_direct(o, &image, cell)?,
                _ => {
                    let (daemon, socket) = start(o, system, &image, cell.queues)?;
                    let vhost =
                        if system != DirectSystem::QsdUring && system != DirectSystem::QsdNative {
                            System::Dovetail
                        } else {
                            System::Qsd
                        };
                    let m = run_vhost(
                        vhost,
                        &socket,
                        daemon.pid(),
                        cell,
                        o.duration,
                        Vec::new(),
                        false,
                    )?;
                    drop(daemon);
                    let cpu = m.backend_cpu.unwrap_or(0.0) / 100.0 * 1e6 / m.iops.max(1.0);
                    figure(system, &m, cpu)
                }
            };
            eprintln!(
                "{:<24} {:<22} {:>9.0} IOPS {:>8.1} MB/s p50 {:>8.1} us p99 {:>8.1} us CPU {:>6.1} us/req",
                cell.label(),
                system.name(),
                f.iops,
                f.mb_per_s,
                f.p50_us,
                f.p99_us,
                f.cpu_us_per_req
            );
            figures.push(f);
        }
        let row = Row {
            cell: cell.label(),
            qd32: cell.iodepth == 32,
            qd1: cell.iodepth == 1,
            figures,
        };
        eprintln!(
            "{:<24} dovetail/qsd {:.2}  dovetail/fio {:.2}  parallax-v1/raw {:.2}  \
             parallax-v2/raw {:.2}",
            row.cell,
            row.vs_qsd(),
            row.vs_fio(),
            row.parallax_vs_raw(),
            row.store_vs_raw(DirectSystem::DovetailParallaxV2)
        );
        rows.push(row);
    }
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(o.dir.join("store"));
    Ok(DirectResult {
        rows,
        dropped_caches: dropped_all,
        size: o.size,
        seconds: o.duration.as_secs_f64(),
        runtime_secs: started.elapsed().as_secs_f64(),
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The tables, as printed and as written into the section.
pub fn tables(r: &DirectResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| cell | fio io_uring (limit) | qsd aio=io_uring | qsd aio=native | dovetail --cache none | dovetail/qsd | dovetail/fio |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in &r.rows {
        let cell = |s: DirectSystem| {
            row.get(s).map_or("-".to_string(), |f| {
                format!("{:.0} IOPS, {:.1} µs CPU/req", f.iops, f.cpu_us_per_req)
            })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2}× | {:.2}× |",
            row.cell,
            cell(DirectSystem::Fio),
            cell(DirectSystem::QsdUring),
            cell(DirectSystem::QsdNative),
            cell(DirectSystem::Dovetail),
            row.vs_qsd(),
            row.vs_fio()
        );
    }
    let _ = writeln!(
        s,
        "\n| cell | p50 / p99 µs: fio | qsd (better) | dovetail |\n| --- | ---: | ---: | ---: |"
    );
    for row in &r.rows {
        let lat = |f: Option<&Figure>| {
            f.map_or("-".to_string(), |f| {
                format!("{:.0} / {:.0}", f.p50_us, f.p99_us)
            })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            row.cell,
            lat(row.get(DirectSystem::Fio)),
            lat(row.best_qsd()),
            lat(row.get(DirectSystem::Dovetail))
        );
    }
    let prows: Vec<&Row> = r
        .rows
        .iter()
        .filter(|x| x.get(DirectSystem::DovetailParallax).is_some())
        .collect();
    if !prows.is_empty() {
        let _ = writeln!(
            s,
            "\n| cell | best qsd | dovetail raw --cache none | dovetail parallax-v1 --cache none | \
             dovetail parallax-v2 --cache none | v1/raw | v2/raw | v1/qsd | v2/qsd |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for row in &prows {
            let f = |s: DirectSystem| {
                row.get(s).map_or("-".to_string(), |f| {
                    format!(
                        "{:.0} IOPS, p99 {:.0} µs, {:.1} µs CPU/req",
                        f.iops, f.p99_us, f.cpu_us_per_req
                    )
                })
            };
            let qsd = row.best_qsd().map_or(0.0, |q| q.iops);
            let vs_qsd = |s: DirectSystem| row.get(s).map_or(0.0, |f| ratio(f.iops, qsd));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
                row.cell,
                row.best_qsd().map_or("-".to_string(), |f| format!(
                    "{:.0} IOPS, p99 {:.0} µs, {:.1} µs CPU/req",
                    f.iops, f.p99_us, f.cpu_us_per_req
                )),
                f(DirectSystem::Dovetail),
                f(DirectSystem::DovetailParallax),
                f(DirectSystem::DovetailParallaxV2),
                row.parallax_vs_raw(),
                row.store_vs_raw(DirectSystem::DovetailParallaxV2),
                vs_qsd(DirectSystem::DovetailParallax),
                vs_qsd(DirectSystem::DovetailParallaxV2),
            );
        }
    }
    let preads: Vec<&Row> = prows
        .iter()
        .copied()
        .filter(|x| x.cell.starts_with("randread"))
        .collect();
    let qd32: Vec<&Row> = r.rows.iter().filter(|x| x.qd32).collect();
    let qd1: Vec<&Row> = r.rows.iter().filter(|x| x.qd1).collect();
    let min =
        |rows: &[&Row], f: fn(&Row) -> f64| rows.iter().map(|x| f(x)).fold(f64::INFINITY, f64::min);
    let (q32_qsd, q32_fio, q1_qsd, px) = (
        min(&qd32, Row::vs_qsd),
        min(&qd32, Row::vs_fio),
        min(&qd1, Row::vs_qsd),
        min(&preads, Row::parallax_vs_raw),
    );
    let _ = writeln!(
        s,
        "\n| target | worst cell | verdict |\n| --- | ---: | --- |"
    );
    for (what, worst, want) in [
        ("≥ 1.2× qsd in every QD32 cell", q32_qsd, 1.2),
        ("≥ 0.9× fio direct in every QD32 cell", q32_fio, 0.9),
        ("≥ 1.0× qsd at QD1", q1_qsd, 1.0),
        ("parallax-v1 ≥ 0.85× raw on 4K random reads", px, 0.85),
    ] {
        if worst.is_finite() {
            let _ = writeln!(s, "| {what} | {worst:.2}× | {} |", verdict(worst >= want));
        } else {
            let _ = writeln!(s, "| {what} | - | no such cell measured |");
        }
    }
    s
}

/// The BENCHMARKS.md section.
pub fn section(r: &DirectResult, m: &Machine, command: &str, when: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}\n## {TITLE}\n");
    let _ = writeln!(
        s,
        "Command: `{command}` ({when}, revision {}, {:.0} s in all).\n",
        m.revision, r.runtime_secs
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {}, kernel {}; the backing file ({} MiB of random data) on {}. \
         {}\n",
        m.nproc,
        m.cpu_model,
        m.memory,
        m.kernel,
        r.size >> 20,
        m.filesystem,
        if r.dropped_caches {
            "Before every run the file was fsynced and the page cache dropped \
             (`echo 3 > /proc/sys/vm/drop_caches`)."
        } else {
            "**The page cache could not be dropped** (not root): reads may have hit memory."
        }
    );
    let _ = writeln!(
        s,
        "Each cell runs {:.0} s per system, cell-major, on the same file: host fio `--direct=1 \
         --ioengine=io_uring` (`--numjobs` = queues; the device's limit); qemu-storage-daemon \
         (`--object iothread,id=io0 --blockdev driver=file,...,cache.direct=on,aio=io_uring` or \
         `aio=native`, exported with `iothread=io0`; the better of the two is the ratio's \
         base); dovetail `serve --image IMG --cache none` (O_DIRECT, io_uring, up to 128 \
         requests in flight per queue); on the 4 KiB random cells also dovetail `serve \
         --store DIR --cache none` of a parallax-v1 and of a parallax-v2 disk holding the same \
         bytes (`disk import`; the tier file's extents with O_DIRECT; parallax-v1's reads and \
         whole-block writes mapped to the tier file and submitted on the queue's io_uring, the \
         rest, and all of parallax-v2's, through its thread pool). The vhost-user \
         systems are driven by dovetail-bench's \
         load generator at the cell's queue depth per queue. CPU µs/req: the backend process's \
         CPU time (user + system, /proc) over the run divided by the requests it completed; \
         for fio, fio's own.\n",
        r.seconds
    );
    if let Some(load) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
    {
        let _ = writeln!(
            s,
            "Load average (1 min) at the end of the run: {load} on {} CPUs: whatever else ran \
             on the machine (builds, other benchmarks) shared its CPUs and disk, so compare \
             the systems within this run (they ran cell-major, side by side), not against \
             other runs.\n",
            m.nproc
        );
    }
    s.push_str(&tables(r));
    let _ = writeln!(s, "{END}");
    s
}

pub fn write_section(path: &Path, section: &str) -> Result<(), CompareError> {
    crate::section::write(path, section, BEGIN, END, Some("## Layouts"))
}
