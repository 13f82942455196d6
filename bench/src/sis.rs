//! `dovetail-bench sis`: what single-instance blocks (the store's shared pool) save and cost,
//! in one run.
//!
//! 1. **Space.** For each of four stores (one version / a 2-member Tee, each with and without
//!    `store create --single-instance`): a parallax-v1 disk of SIZE imported from one image of
//!    pseudo-random data (every block distinct and non-zero); for the Tee, a parallax-v1
//!    candidate attached offline (`disk tee --policy mirror-only`) and filled by the offline
//!    copy-out (`dovetail migrate`). The store's space is the data file's allocated bytes
//!    (`st_blocks`, the file is sparse) and the extents granted; the figure is that space ÷
//!    SIZE.
//! 2. **IOPS.** The two Tee stores are served in turn (`dovetail serve`, one queue) and driven
//!    by the load generator: 4 KiB random writes of self-describing blocks (every write distinct,
//!    a FLUSH every FLUSH-EVERY writes) and 4 KiB random reads, at queue depth 8, for SECONDS
//!    each, the order of the two stores alternating over PAIRS pairs. The figure is the IOPS
//!    with single-instance blocks ÷ without.
//!
//! The write-up is one section of BENCHMARKS.md between marker comments, replaced alone.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::compare::{prepare_image, ratio, sync_dir, CompareError, Daemon, Machine};
use crate::load::{self, Limit, Pattern, Workload};
use crate::units::format_size;
use crate::verify::VerifyState;

pub const BEGIN: &str = "<!-- dovetail-bench sis: begin -->";
pub const END: &str = "<!-- dovetail-bench sis: end -->";
pub const TITLE: &str = "Single-instance blocks: a Tee's space and IOPS";
/// A 2-member Tee's space with single-instance blocks ÷ one version's data should stay at or
/// under this.
pub const SPACE_TARGET: f64 = 1.1;
/// IOPS with single-instance blocks ÷ without should reach this (a cost of at most 10%).
pub const IOPS_TARGET: f64 = 0.9;
const DISK: &str = "vm";

#[derive(Debug, Clone)]
pub struct SisOptions {
    pub dovetail: PathBuf,
    pub dir: PathBuf,
    pub size: u64,
    pub seconds: Duration,
    pub pairs: u32,
    pub flush_every: u64,
    pub iodepth: u16,
}

/// One store of part 1.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceRow {
    pub members: u32,
    pub single_instance: bool,
    /// Allocated bytes of the data file.
    pub allocated: u64,
    /// Extents granted (versions' and the pool's).
    pub extents: u32,
    pub extent_size: u64,
    /// `allocated ÷ size`.
    pub ratio: f64,
    /// Seconds the import and (for a Tee) the copy-out took.
    pub import_s: f64,
    pub copyout_s: f64,
}

/// One phase of part 2.
#[derive(Debug, Clone, Serialize)]
pub struct IopsPhase {
    pub single_instance: bool,
    pub pattern: &'static str,
    pub pair: u32,
    pub iops: f64,
    pub io_errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SisResult {
    pub size: u64,
    pub seconds: f64,
    pub flush_every: u64,
    pub iodepth: u16,
    pub space: Vec<SpaceRow>,
    pub phases: Vec<IopsPhase>,
    pub runtime_s: f64,
}

impl SisResult {
    /// Mean IOPS of the phases of `pattern` with single-instance blocks on or off.
    pub fn mean(&self, pattern: &str, on: bool) -> f64 {
        let v: Vec<f64> = self
            .phases
            .iter()
            .filter(|p| p.pattern == pattern && p.single_instance == on)
            .map(|p| p.iops)
            .collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
}

fn msg(s: impl Into<String>) -> CompareError {
    CompareError::Pause(s.into())
}

fn run_tool(program: &Path, args: &[String]) -> Result<Duration, CompareError> {
    let t = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CompareError::Io {
            what: format!("run {} {}", program.display(), args.join(" ")),
            source,
        })?;
    if !out.status.success() {
        return Err(CompareError::Tool {
            tool: format!("{} {}", program.display(), args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(t.elapsed())
}

fn dovetail(o: &SisOptions, args: &[&str]) -> Result<Duration, CompareError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run_tool(&o.dovetail, &args)
}

fn store_dir(o: &SisOptions, members: u32, on: bool) -> PathBuf {
    o.dir.join(format!(
        "store-{members}-{}",
        if on { "si" } else { "plain" }
    ))
}

/// Part 1 for one store: created, imported, teed and copied out; its space measured.
fn space_row(
    o: &SisOptions,
    image: &Path,
    members: u32,
    on: bool,
) -> Result<SpaceRow, CompareError> {
    let dir = store_dir(o, members, on);
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    // Room for three copies and the trees: the plain Tee needs two.
    let store_size = format!("{}", (3 * o.size).div_ceil(64 << 20) * (64 << 20));
    let mut create = vec!["store", "create", &d, "--size", &store_size];
    if on {
        create.push("--single-instance");
    }
    dovetail(o, &create)?;
    let size = o.size.to_string();
    dovetail(
        o,
        &[
            "disk",
            "create",
            &d,
            DISK,
            "--size",
            &size,
            "--layout",
            "parallax-v1",
        ],
    )?;
    let img = image.display().to_string();
    let import = dovetail(o, &["disk", "import", "--from", &img, &d, DISK])?;
    let mut copyout = Duration::ZERO;
    if members == 2 {
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
                "mirror-only",
            ],
        )?;
        copyout = dovetail(o, &["migrate", &d, DISK])?;
    }
    sync_dir(&dir)?;
    let data = dir.join("data.0");
    let meta = std::fs::metadata(&data).map_err(|source| CompareError::Io {
        what: format!("stat {}", data.display()),
        source,
    })?;
    let allocated = meta.blocks() * 512;
    let store = dovetail_store::Store::open_reader(&dir).map_err(|e| msg(e.to_string()))?;
    let info = store.info();
    let row = SpaceRow {
        members,
        single_instance: on,
        allocated,
        extents: info.extent_count - info.free_extents,
        extent_size: info.extent_size,
        ratio: allocated as f64 / o.size as f64,
        import_s: import.as_secs_f64(),
        copyout_s: copyout.as_secs_f64(),
    };
    eprintln!(
        "sis: {members} member(s), single-instance {}: {} allocated ({:.3}x the disk's data), {} \
         extents granted; import {:.1} s, copy-out {:.1} s",
        if on { "on" } else { "off" },
        format_size(allocated),
        row.ratio,
        row.extents,
        row.import_s,
        row.copyout_s
    );
    Ok(row)
}

/// Part 2: one phase of `pattern` on the Tee store with single-instance blocks `on`.
fn iops_phase(
    o: &SisOptions,
    on: bool,
    pair: u32,
    pattern: Pattern,
    state: &mut VerifyState,
) -> Result<IopsPhase, CompareError> {
    let dir = store_dir(o, 2, on);
    let socket = o.dir.join("sis.sock");
    let control = o.dir.join("sis-control.sock");
    let log = o.dir.join("sis-daemon.log");
    let _ = std::fs::remove_file(&control);
    let mut cmd = Command::new(&o.dovetail);
    cmd.arg("serve")
        .arg("--store")
        .arg(&dir)
        .arg("--disk")
        .arg(format!("{DISK}={}", socket.display()))
        .arg("--control")
        .arg(&control)
        .arg("--queues")
        .arg("1");
    let daemon = Daemon::spawn("dovetail", cmd, &socket, &log, None)?;
    let w = Workload {
        block_size: 4096,
        iodepth: o.iodepth,
        queues: 1,
        limit: Limit::Time(o.seconds),
        verify: pattern.writes(),
        flush_every: if pattern.writes() { o.flush_every } else { 0 },
        seed: u64::from(pair) * 2 + u64::from(on),
        ..Workload::new(pattern)
    };
    let name = format!(
        "{} single-instance {} pair {pair}",
        pattern.name(),
        if on { "on" } else { "off" }
    );
    let load_err = |source| CompareError::Load {
        system: "dovetail",
        cell: format!("sis benchmark, {name}"),
        source,
    };
    let (driver, device) = load::connect(&socket, &w).map_err(load_err)?;
    let r = load::run(&driver, &device, &w, w.verify.then_some(state)).map_err(load_err)?;
    drop(driver);
    drop(daemon);
    eprintln!(
        "sis: {name}: {:.0} IOPS, {} I/O errors",
        r.iops(),
        r.io_errors
    );
    if r.io_errors > 0 {
        return Err(msg(format!("{name}: {} I/O errors", r.io_errors)));
    }
    Ok(IopsPhase {
        single_instance: on,
        pattern: pattern.name(),
        pair,
        iops: r.iops(),
        io_errors: r.io_errors,
    })
}

pub fn run(o: &SisOptions) -> Result<SisResult, CompareError> {
    let start = Instant::now();
    std::fs::create_dir_all(&o.dir).map_err(|source| CompareError::Io {
        what: format!("create {}", o.dir.display()),
        source,
    })?;
    let image = o.dir.join("sis.img");
    eprintln!("sis: writing a {} image ...", format_size(o.size));
    prepare_image(&image, o.size)?;
    let mut space = Vec::new();
    for members in [1, 2] {
        for on in [false, true] {
            space.push(space_row(o, &image, members, on)?);
        }
    }
    let _ = std::fs::remove_file(&image);
    let blocks = o.size / 4096;
    // One record per store: each keeps its own disk's writes.
    let mut states = [
        VerifyState::new(4096, 0, blocks),
        VerifyState::new(4096, 0, blocks),
    ];
    let mut phases = Vec::new();
    for pair in 1..=o.pairs {
        let order = if pair % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for pattern in [Pattern::RandWrite, Pattern::RandRead] {
            for on in order {
                phases.push(iops_phase(
                    o,
                    on,
                    pair,
                    pattern,
                    &mut states[usize::from(on)],
                )?);
            }
        }
    }
    for on in [false, true] {
        let _ = std::fs::remove_dir_all(store_dir(o, 1, on));
    }
    Ok(SisResult {
        size: o.size,
        seconds: o.seconds.as_secs_f64(),
        flush_every: o.flush_every,
        iodepth: o.iodepth,
        space,
        phases,
        runtime_s: start.elapsed().as_secs_f64(),
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The results as plain tables.
pub fn tables(r: &SisResult) -> String {
    let mut s = String::new();
    let one = r
        .space
        .iter()
        .find(|x| x.members == 1 && !x.single_instance)
        .map_or(0, |x| x.allocated);
    let _ = writeln!(
        s,
        "| store | single-instance blocks | data file allocated | extents granted | ÷ the disk's data | ÷ one version's store |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- |");
    for x in &r.space {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} × {} | {:.3} | {:.3} |",
            if x.members == 1 {
                "one version".to_string()
            } else {
                format!("{}-member Tee", x.members)
            },
            if x.single_instance { "on" } else { "off" },
            format_size(x.allocated),
            x.extents,
            format_size(x.extent_size),
            x.ratio,
            ratio(x.allocated as f64, one as f64)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| 2-member Tee (mirror-only), 4 KiB, QD {} | IOPS without | IOPS with | with ÷ without |",
        r.iodepth
    );
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for p in ["randwrite", "randread"] {
        let (off, on) = (r.mean(p, false), r.mean(p, true));
        let _ = writeln!(s, "| {p} | {off:.0} | {on:.0} | {:.3} |", ratio(on, off));
    }
    s
}

pub fn section(r: &SisResult, machine: &Machine, command: &str, when: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{BEGIN}\n## {TITLE}\n");
    let _ = writeln!(
        s,
        "Measured on {when} by the command below, in a run of its own ({:.0} s).\n\n```\n{command}\n```\n",
        r.runtime_s
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {} of RAM, {}, kernel {}; the files on {}; dovetail revision {}. \
         Other builds and tests may have shared the machine during the run: compare the rows of \
         one table (ratios within one run), not runs.\n",
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
        "Space: a parallax-v1 disk of {} imported in full from pseudo-random data (every block \
         distinct), then, for the Tee, a parallax-v1 candidate filled by the offline copy-out \
         (`disk tee --policy mirror-only`, `migrate`). IOPS: the Tee stores served in turn, one \
         queue, 4 KiB random writes of distinct self-describing blocks (a FLUSH every {} writes) \
         and 4 KiB random reads, {:.0} s per phase, {} pairs alternating in order; the figures are \
         the means.\n",
        format_size(r.size),
        r.flush_every,
        r.seconds,
        r.phases.len() / 4
    );
    s.push_str(&tables(r));
    let tee = r
        .space
        .iter()
        .find(|x| x.members == 2 && x.single_instance)
        .map_or(f64::NAN, |x| x.ratio);
    let w = ratio(r.mean("randwrite", true), r.mean("randwrite", false));
    let rd = ratio(r.mean("randread", true), r.mean("randread", false));
    let _ = writeln!(
        s,
        "\nTargets: a 2-member Tee with single-instance blocks in at most {SPACE_TARGET}× one \
         version's data: {tee:.3}×, {}; single-instance blocks cost a 2-member Tee at most 10% \
         of its IOPS: random writes {w:.3}×, {}; random reads {rd:.3}×, {}.",
        verdict(tee <= SPACE_TARGET),
        verdict(w >= IOPS_TARGET),
        verdict(rd >= IOPS_TARGET)
    );
    let _ = writeln!(s, "\n{END}");
    s
}

pub fn write_section(path: &Path, section: &str) -> Result<(), CompareError> {
    crate::section::write(path, section, BEGIN, END, None)
}
