//! `dovetail-bench commits`: the request path's stalls under writes with FLUSH and timer
//! commits, raw against parallax-v1 and parallax-v2 side by side in one run.
//!
//! Two kinds of cell, each selectable (`--cells`):
//!
//! - **single**: one raw image (`serve --image`) and one store with a parallax-v1 and a
//!   parallax-v2 disk (`serve --store`), all of the same size, each written in full first
//!   (4 KiB sequential). Then, for each FLUSH interval, randwrite 4 KiB QD32 on 2 queues on each
//!   variant in turn: IOPS, p99.9 and the slowest request.
//! - **tenants**: four disks of one system at once: one *noisy* tenant writing 1 MiB
//!   sequentially (QD8) with a FLUSH every 2000 writes, three *quiet* ones randwrite 4 KiB QD8
//!   with a FLUSH every 32 writes; then the three quiet ones alone. The systems: four raw images
//!   (one `serve --image` each, the baseline), a store of four parallax-v1 disks, a store of
//!   four parallax-v2 disks (one `serve --store` each), and qemu-storage-daemon with four files
//!   (`cache.direct=on,aio=io_uring`, an iothread per export; the raw images again). The
//!   quiet tenants' p99 and slowest request with and without the noisy one tell whether one
//!   disk's commits stall the others.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use std::sync::Barrier;

use hdrhistogram::Histogram;

use crate::compare::{qsd_direct_exports, ratio, sync_dir, CompareError, Daemon, Machine};
use crate::layouts::dovetail_cmd;
use crate::load::{self, Limit, Pattern, Workload};
use crate::units::format_size;

pub const TITLE: &str = "Stalls under commits (raw, parallax-v1, parallax-v2)";
const BEGIN: &str = "<!-- dovetail-bench commits: begin -->";
const END: &str = "<!-- dovetail-bench commits: end -->";

/// What to run.
#[derive(Debug, Clone)]
pub struct CommitsOptions {
    pub dovetail: PathBuf,
    pub dir: PathBuf,
    pub size: u64,
    pub duration: Duration,
    /// FLUSH every N writes per queue (0: none).
    pub flush_every: Vec<u64>,
    /// Which cells to run.
    pub cells: Vec<CellSet>,
    /// qemu-storage-daemon for the four-tenant cell (`None`: that system is left out).
    pub qsd: Option<PathBuf>,
    /// `--cache MODE` for the store daemons (`serve --store DIR --cache MODE`); `None`: the
    /// daemon's default. Raw images always run with the daemon's default for a file.
    pub store_cache: Option<String>,
}

/// The kinds of cell (`--cells`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum CellSet {
    /// One disk per system, randwrite 4 KiB QD32 on 2 queues, per FLUSH interval.
    Single,
    /// Four disks on one store: one noisy tenant, three quiet ones.
    Tenants,
}

/// The four-tenant cell's target: the quiet tenants' p99 with the noisy one at most this many
/// times their p99 without it.
pub const TENANT_P99_RATIO: f64 = 1.5;
/// The stall target: no request (of the measured tenants) takes this long or longer.
pub const STALL_TARGET: Duration = Duration::from_millis(50);
/// Disks in the four-tenant cell; the first is the noisy one.
pub const TENANTS: usize = 4;
/// The noisy tenant: 1 MiB sequential writes, a FLUSH every this many.
pub const NOISY_FLUSH_EVERY: u64 = 2000;
/// The quiet tenants: 4 KiB random writes, a FLUSH every this many.
pub const QUIET_FLUSH_EVERY: u64 = 32;
/// The systems of the four-tenant cell, in the order they run.
pub const TENANT_SYSTEMS: [&str; 4] = ["raw", "parallax-v1", "parallax-v2", "qemu-storage-daemon"];

/// One cell of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub variant: String,
    pub flush_every: u64,
    pub iops: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub io_errors: u64,
}

/// One run of the four-tenant cell on one system: the quiet tenants with the noisy one
/// (`noisy`) or alone.
#[derive(Debug, Clone, Serialize)]
pub struct TenantRun {
    pub system: String,
    pub noisy: bool,
    /// The three quiet tenants' IOPS, summed.
    pub quiet_iops: f64,
    /// Percentiles and slowest of the quiet tenants' requests, all three together.
    pub quiet_p99_us: f64,
    pub quiet_p999_us: f64,
    pub quiet_max_us: f64,
    /// Each quiet tenant's p99 and slowest request.
    pub quiet_each_p99_us: Vec<f64>,
    pub quiet_each_max_us: Vec<f64>,
    /// Quiet requests that took [`STALL_TARGET`] or longer.
    pub quiet_over_target: u64,
    /// The noisy tenant's throughput (MB/s, 10^6 bytes), slowest write and FLUSHes sent.
    pub noisy_mb_s: f64,
    pub noisy_max_us: f64,
    pub noisy_flushes: u64,
    pub io_errors: u64,
}

/// The four-tenant cell of one system, against its targets.
#[derive(Debug, Clone, Serialize)]
pub struct TenantVerdict {
    pub system: String,
    /// Quiet p99 with the noisy tenant / without.
    pub p99_ratio: f64,
    pub p99_met: bool,
    /// No quiet request of either run took [`STALL_TARGET`] or longer.
    pub stall_met: bool,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct CommitsResult {
    pub size: u64,
    pub duration_s: f64,
    pub figures: Vec<Figures>,
    /// The four-tenant cell (empty if not run).
    pub tenants: Vec<TenantRun>,
    /// Systems of the four-tenant cell left out, and why.
    pub tenants_skipped: Vec<String>,
    /// The store daemons' `--cache` mode, if one was given.
    pub store_cache: Option<String>,
    /// The machine's load averages (1, 5, 15 min) when the run started and when it ended: how
    /// busy other work kept it.
    pub load_before: String,
    pub load_after: String,
    pub runtime_s: f64,
}

impl CommitsResult {
    /// The four-tenant verdicts, one per system that ran both ways.
    pub fn tenant_verdicts(&self) -> Vec<TenantVerdict> {
        let mut out = Vec::new();
        for sys in TENANT_SYSTEMS {
            let get = |noisy| {
                self.tenants
                    .iter()
                    .find(|t| t.system == sys && t.noisy == noisy)
            };
            let (Some(with), Some(without)) = (get(true), get(false)) else {
                continue;
            };
            let p99_ratio = ratio(with.quiet_p99_us, without.quiet_p99_us);
            out.push(TenantVerdict {
                system: sys.to_string(),
                p99_ratio,
                p99_met: without.quiet_p99_us > 0.0 && p99_ratio <= TENANT_P99_RATIO,
                stall_met: with.quiet_over_target == 0 && without.quiet_over_target == 0,
            });
        }
        out
    }
}

const VARIANTS: [&str; 3] = ["raw", "parallax-v1", "parallax-v2"];

fn io(what: String) -> impl FnOnce(std::io::Error) -> CompareError {
    move |source| CompareError::Io { what, source }
}

fn wait_for(path: &Path, log: &Path) -> Result<(), CompareError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(CompareError::NoSocket("dovetail", log.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn load_err(what: &str) -> impl FnOnce(load::LoadError) -> CompareError + '_ {
    move |e| CompareError::Pause(format!("{what}: {e}"))
}

/// Runs the benchmark.
pub fn run(o: &CommitsOptions) -> Result<CommitsResult, CompareError> {
    let started = Instant::now();
    let load_before = load_average();
    std::fs::create_dir_all(&o.dir).map_err(io(format!("create {}", o.dir.display())))?;
    let figures = if o.cells.contains(&CellSet::Single) {
        run_single(o)?
    } else {
        Vec::new()
    };
    let (tenants, tenants_skipped) = if o.cells.contains(&CellSet::Tenants) {
        run_tenants(o)?
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(CommitsResult {
        size: o.size,
        duration_s: o.duration.as_secs_f64(),
        figures,
        tenants,
        tenants_skipped,
        store_cache: o.store_cache.clone(),
        load_before,
        load_after: load_average(),
        runtime_s: started.elapsed().as_secs_f64(),
    })
}

/// The first three fields of /proc/loadavg ("?" where it cannot be read).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// A raw image of `size` bytes at `path`, created (or cut) afresh.
fn raw_image(path: &Path, size: u64) -> Result<(), CompareError> {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).map_err(io(format!("create {}", path.display())))?;
    f.set_len(size)
        .map_err(io(format!("size {}", path.display())))?;
    Ok(())
}

/// `serve --store` with the store's `--cache` mode if one was given.
fn store_serve(o: &CommitsOptions, store: &Path) -> Command {
    let mut st = Command::new(&o.dovetail);
    st.arg("serve").arg("--store").arg(store);
    if let Some(mode) = &o.store_cache {
        st.arg("--cache").arg(mode);
    }
    st
}

/// A fresh store at `store` holding `disks` (name, layout), room for each to be copied on
/// write several times over (sparse: only what is written takes space).
fn create_store(
    o: &CommitsOptions,
    store: &Path,
    disks: &[(String, &str)],
) -> Result<(), CompareError> {
    let _ = std::fs::remove_dir_all(store);
    let extent = 64u64 << 20;
    let per_disk = o.size.div_ceil(extent) * 3;
    let store_size = (per_disk * disks.len() as u64 + 8) * extent;
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
    for (name, layout) in disks {
        dovetail_cmd(
            &o.dovetail,
            &[
                s("disk"),
                s("create"),
                d.clone(),
                name.clone(),
                s("--size"),
                o.size.to_string(),
                s("--layout"),
                s(layout),
            ],
        )?;
    }
    Ok(())
}

/// The single-disk cells.
fn run_single(o: &CommitsOptions) -> Result<Vec<Figures>, CompareError> {
    let store = o.dir.join("commits-store");
    let image = o.dir.join("commits-raw.img");
    raw_image(&image, o.size)?;
    let disks: Vec<(String, &str)> = VARIANTS[1..].iter().map(|v| (v.to_string(), *v)).collect();
    create_store(o, &store, &disks)?;
    let sockets: Vec<PathBuf> = VARIANTS
        .iter()
        .map(|v| o.dir.join(format!("commits-{v}.sock")))
        .collect();
    let mut raw = Command::new(&o.dovetail);
    raw.arg("serve")
        .arg("--image")
        .arg(&image)
        .arg("--socket")
        .arg(&sockets[0])
        .arg("--queues")
        .arg("2");
    let raw_log = o.dir.join("commits-raw.log");
    let raw_daemon = Daemon::spawn("dovetail", raw, &sockets[0], &raw_log, None)?;
    let mut st = store_serve(o, &store);
    for (v, sock) in VARIANTS[1..].iter().zip(&sockets[1..]) {
        st.arg("--disk").arg(format!("{v}={}", sock.display()));
    }
    st.arg("--queues").arg("2");
    let st_log = o.dir.join("commits-store.log");
    let store_daemon = Daemon::spawn("dovetail", st, &sockets[1], &st_log, None)?;
    wait_for(&sockets[2], &st_log)?;

    let fill = Workload {
        block_size: 4096,
        iodepth: 32,
        queues: 2,
        limit: Limit::Passes(1),
        timeout: Duration::from_secs(30),
        ..Workload::new(Pattern::Write)
    };
    for (v, sock) in VARIANTS.iter().zip(&sockets) {
        eprintln!("commits: writing {v} ({}) in full ...", format_size(o.size));
        load::run_against(sock, &fill, None).map_err(load_err(v))?;
    }
    sync_dir(&store)?;
    let mut figures = Vec::new();
    for &every in &o.flush_every {
        for (v, sock) in VARIANTS.iter().zip(&sockets) {
            let w = Workload {
                block_size: 4096,
                iodepth: 32,
                queues: 2,
                limit: Limit::Time(o.duration),
                timeout: Duration::from_secs(30),
                flush_every: every,
                seed: 7,
                ..Workload::new(Pattern::RandWrite)
            };
            sync_dir(&store)?;
            let r = load::run_against(sock, &w, None).map_err(load_err(v))?;
            let lat = r.latency_us();
            eprintln!(
                "commits: {v} flush every {every}: {:.0} IOPS, p99.9 {:.0} us, max {:.0} us",
                r.iops(),
                lat.p999,
                lat.max
            );
            figures.push(Figures {
                variant: v.to_string(),
                flush_every: every,
                iops: r.iops(),
                p99_us: lat.p99,
                p999_us: lat.p999,
                max_us: lat.max,
                io_errors: r.io_errors,
            });
        }
    }
    // Stop the daemons, then give the disk space back for the cells that follow.
    drop((raw_daemon, store_daemon));
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_file(&image);
    Ok(figures)
}

/// A quiet tenant's load: randwrite 4 KiB QD8 on one queue, a FLUSH every 32 writes.
fn quiet_workload(duration: Duration, seed: u64) -> Workload {
    Workload {
        block_size: 4096,
        iodepth: 8,
        queues: 1,
        limit: Limit::Time(duration),
        timeout: Duration::from_secs(30),
        flush_every: QUIET_FLUSH_EVERY,
        seed,
        slow_threshold: Some(STALL_TARGET),
        ..Workload::new(Pattern::RandWrite)
    }
}

/// The noisy tenant's load: 1 MiB sequential writes QD8 on one queue, a FLUSH every 2000.
fn noisy_workload(duration: Duration) -> Workload {
    Workload {
        block_size: 1 << 20,
        iodepth: 8,
        queues: 1,
        limit: Limit::Time(duration),
        timeout: Duration::from_secs(30),
        flush_every: NOISY_FLUSH_EVERY,
        ..Workload::new(Pattern::Write)
    }
}

/// Writes each of `sockets`' disks in full, 4 KiB sequential writes, one at a time.
fn fill_tenants(system: &str, sockets: &[PathBuf], size: u64) -> Result<(), CompareError> {
    let fill = Workload {
        block_size: 4096,
        iodepth: 32,
        queues: 1,
        limit: Limit::Passes(1),
        timeout: Duration::from_secs(30),
        ..Workload::new(Pattern::Write)
    };
    eprintln!(
        "commits: writing {system}'s {} disks ({} each) in full ...",
        sockets.len(),
        format_size(size)
    );
    for sock in sockets {
        load::run_against(sock, &fill, None).map_err(load_err(system))?;
    }
    Ok(())
}

/// One run of the four-tenant cell: the quiet tenants on `sockets[1..]` and, if `noisy`, the
/// noisy one on `sockets[0]`, all started together.
fn tenants_once(
    system: &str,
    sockets: &[PathBuf],
    noisy: bool,
    duration: Duration,
) -> Result<TenantRun, CompareError> {
    let first = usize::from(!noisy);
    let barrier = Barrier::new(sockets.len() - first);
    let reports: Vec<Result<load::Report, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = sockets
            .iter()
            .enumerate()
            .skip(first)
            .map(|(idx, sock)| {
                let w = if idx == 0 {
                    noisy_workload(duration)
                } else {
                    quiet_workload(duration, 7 + idx as u64)
                };
                let barrier = &barrier;
                sc.spawn(move || {
                    // Wait at the barrier whatever happens, so no other tenant waits forever.
                    let c = load::connect(sock, &w);
                    barrier.wait();
                    let (driver, device) = c.map_err(|e| format!("tenant {idx}: {e}"))?;
                    load::run(&driver, &device, &w, None).map_err(|e| format!("tenant {idx}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a load thread panicked".into()))
            })
            .collect()
    });
    let mut quiet = Vec::new();
    let mut noisy_report = None;
    for (i, r) in reports.into_iter().enumerate() {
        let r = r.map_err(|e| CompareError::Pause(format!("{system}: {e}")))?;
        if i + first == 0 {
            noisy_report = Some(r);
        } else {
            quiet.push(r);
        }
    }
    let mut all: Histogram<u64> = Histogram::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| CompareError::Pause(format!("histogram: {e}")))?;
    for r in &quiet {
        all.add(&r.latency)
            .map_err(|e| CompareError::Pause(format!("histogram: {e}")))?;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let run = TenantRun {
        system: system.to_string(),
        noisy,
        quiet_iops: quiet.iter().map(load::Report::iops).sum(),
        quiet_p99_us: us(all.value_at_quantile(0.99)),
        quiet_p999_us: us(all.value_at_quantile(0.999)),
        quiet_max_us: us(all.max()),
        quiet_each_p99_us: quiet.iter().map(|r| r.latency_us().p99).collect(),
        quiet_each_max_us: quiet.iter().map(|r| r.latency_us().max).collect(),
        quiet_over_target: quiet.iter().map(|r| r.slow.len() as u64).sum(),
        noisy_mb_s: noisy_report.as_ref().map_or(0.0, load::Report::mb_per_s),
        noisy_max_us: noisy_report.as_ref().map_or(0.0, |r| r.latency_us().max),
        noisy_flushes: noisy_report.as_ref().map_or(0, |r| r.flushes),
        io_errors: quiet.iter().map(|r| r.io_errors).sum::<u64>()
            + noisy_report.as_ref().map_or(0, |r| r.io_errors),
    };
    eprintln!(
        "commits: {system} quiet tenants {} the noisy one: {:.0} IOPS, p99 {:.0} us, max {:.0} us, \
         {} at {} ms or more; noisy {:.0} MB/s",
        if noisy { "with" } else { "without" },
        run.quiet_iops,
        run.quiet_p99_us,
        run.quiet_max_us,
        run.quiet_over_target,
        STALL_TARGET.as_millis(),
        run.noisy_mb_s
    );
    Ok(run)
}

/// Whether `qsd --version` runs; the reason it does not otherwise.
fn qsd_usable(qsd: &Path) -> Result<(), String> {
    match Command::new(qsd).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{} --version failed ({})",
            qsd.display(),
            out.status
        )),
        Err(e) => Err(format!("{} did not start: {e}", qsd.display())),
    }
}

/// The four-tenant cell on every system (module docs).
fn run_tenants(o: &CommitsOptions) -> Result<(Vec<TenantRun>, Vec<String>), CompareError> {
    let raw_dir = o.dir.join("tenants-raw");
    let store = o.dir.join("tenants-store");
    let _ = std::fs::remove_dir_all(&raw_dir);
    std::fs::create_dir_all(&raw_dir).map_err(io(format!("create {}", raw_dir.display())))?;
    let images: Vec<PathBuf> = (0..TENANTS)
        .map(|i| raw_dir.join(format!("tenant-{i}.img")))
        .collect();
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for system in TENANT_SYSTEMS {
        let sockets: Vec<PathBuf> = (0..TENANTS)
            .map(|i| o.dir.join(format!("tenants-{i}.sock")))
            .collect();
        let log = o.dir.join(format!("tenants-{system}.log"));
        let mut daemons = Vec::new();
        let data_dir = match system {
            "raw" => {
                for (img, sock) in images.iter().zip(&sockets) {
                    raw_image(img, o.size)?;
                    let mut cmd = Command::new(&o.dovetail);
                    cmd.arg("serve")
                        .arg("--image")
                        .arg(img)
                        .arg("--socket")
                        .arg(sock)
                        .arg("--queues")
                        .arg("1");
                    let log = o.dir.join(format!("tenants-raw-{}.log", daemons.len()));
                    daemons.push(Daemon::spawn("dovetail", cmd, sock, &log, None)?);
                }
                fill_tenants(system, &sockets, o.size)?;
                raw_dir.clone()
            }
            "qemu-storage-daemon" => {
                let Some(qsd) = &o.qsd else {
                    skipped.push(format!("{system}: not asked for"));
                    continue;
                };
                if let Err(why) = qsd_usable(qsd) {
                    skipped.push(format!("{system}: {why}"));
                    continue;
                }
                if !images.iter().all(|i| i.exists()) {
                    skipped.push(format!("{system}: the raw images were not written"));
                    continue;
                }
                // The raw system's images, already written in full.
                let exports: Vec<(PathBuf, PathBuf)> = images
                    .iter()
                    .cloned()
                    .zip(sockets.iter().cloned())
                    .collect();
                let cmd = qsd_direct_exports(qsd, &exports, 1);
                daemons.push(Daemon::spawn(
                    "qemu-storage-daemon",
                    cmd,
                    &sockets[0],
                    &log,
                    None,
                )?);
                for sock in &sockets[1..] {
                    wait_for(sock, &log)?;
                }
                raw_dir.clone()
            }
            layout => {
                let disks: Vec<(String, &str)> =
                    (0..TENANTS).map(|i| (format!("t{i}"), layout)).collect();
                create_store(o, &store, &disks)?;
                let mut cmd = store_serve(o, &store);
                for ((name, _), sock) in disks.iter().zip(&sockets) {
                    cmd.arg("--disk").arg(format!("{name}={}", sock.display()));
                }
                cmd.arg("--queues").arg("1");
                daemons.push(Daemon::spawn("dovetail", cmd, &sockets[0], &log, None)?);
                for sock in &sockets[1..] {
                    wait_for(sock, &log)?;
                }
                fill_tenants(system, &sockets, o.size)?;
                store.clone()
            }
        };
        for noisy in [true, false] {
            sync_dir(&data_dir)?;
            runs.push(tenants_once(system, &sockets, noisy, o.duration)?);
        }
        drop(daemons);
        if data_dir == store {
            let _ = std::fs::remove_dir_all(&store);
        }
    }
    let _ = std::fs::remove_dir_all(&raw_dir);
    Ok((runs, skipped))
}

fn ms(us: f64) -> String {
    format!("{:.1} ms", us / 1000.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

fn every_label(every: u64) -> String {
    if every == 0 {
        "never".to_string()
    } else {
        every.to_string()
    }
}

/// The single-disk cells as a Markdown table.
fn single_table(r: &CommitsResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| FLUSH every (writes per queue) | layout | IOPS | × raw | p99 | p99.9 | slowest | errors |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for f in &r.figures {
        let raw = r
            .figures
            .iter()
            .find(|g| g.flush_every == f.flush_every && g.variant == "raw")
            .map_or(0.0, |g| g.iops);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {} | {} | {} | {} |",
            every_label(f.flush_every),
            f.variant,
            f.iops,
            if raw > 0.0 { f.iops / raw } else { 0.0 },
            ms(f.p99_us),
            ms(f.p999_us),
            ms(f.max_us),
            f.io_errors
        );
    }
    s
}

/// The four-tenant cell as a Markdown table.
fn tenant_table(r: &CommitsResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| system | noisy tenant | quiet IOPS (3 together) | quiet p99 | quiet p99.9 | quiet \
         slowest | quiet requests ≥ {} ms | p99 / slowest of each quiet tenant | noisy MB/s | \
         noisy slowest | noisy FLUSHes | errors |",
        STALL_TARGET.as_millis()
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
    );
    for t in &r.tenants {
        let each: Vec<String> = t
            .quiet_each_p99_us
            .iter()
            .zip(&t.quiet_each_max_us)
            .map(|(p, m)| format!("{:.1} / {:.1}", p / 1000.0, m / 1000.0))
            .collect();
        let (mb, nmax, nfl) = if t.noisy {
            (
                format!("{:.0}", t.noisy_mb_s),
                ms(t.noisy_max_us),
                t.noisy_flushes.to_string(),
            )
        } else {
            ("–".into(), "–".into(), "–".into())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} ms | {mb} | {nmax} | {nfl} | {} |",
            t.system,
            if t.noisy { "running" } else { "absent" },
            t.quiet_iops,
            ms(t.quiet_p99_us),
            ms(t.quiet_p999_us),
            ms(t.quiet_max_us),
            t.quiet_over_target,
            each.join(", "),
            t.io_errors
        );
    }
    s
}

/// The results as Markdown tables (the cells that ran).
pub fn tables(r: &CommitsResult) -> String {
    let mut s = String::new();
    if !r.figures.is_empty() {
        s.push_str(&single_table(r));
    }
    if !r.tenants.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&tenant_table(r));
    }
    s
}

/// The verdicts against the goals, one Markdown bullet each, for the cells that ran.
pub fn goals(r: &CommitsResult) -> Vec<String> {
    let mut out = Vec::new();
    let target_us = STALL_TARGET.as_secs_f64() * 1e6;
    let get = |every: u64, v: &str| {
        r.figures
            .iter()
            .find(|f| f.flush_every == every && f.variant == v)
    };
    let parallax = &VARIANTS[1..];
    if let Some(raw) = get(32, "raw") {
        let cells: Vec<&Figures> = parallax.iter().filter_map(|v| get(32, v)).collect();
        let iops_ok = !cells.is_empty() && cells.iter().all(|f| ratio(f.iops, raw.iops) >= 0.9);
        let max_ok = !cells.is_empty() && cells.iter().all(|f| f.max_us <= target_us);
        let list = |f: &dyn Fn(&Figures) -> String| {
            cells
                .iter()
                .map(|c| format!("{} {}", c.variant, f(c)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(format!(
            "FLUSH every 32: IOPS ≥ 0.9× raw: {} ({}); slowest request ≤ {} ms: {} ({}; raw {}).",
            verdict(iops_ok),
            list(&|c| format!("{:.2}×", ratio(c.iops, raw.iops))),
            STALL_TARGET.as_millis(),
            verdict(max_ok),
            list(&|c| ms(c.max_us)),
            ms(raw.max_us),
        ));
    }
    if let (Some(v1), Some(v2)) = (get(0, "parallax-v1"), get(0, "parallax-v2")) {
        out.push(format!(
            "No FLUSH: p99.9 of parallax-v2 (timer commits) ≤ 2× parallax-v1's: {} ({} against \
             {}, {:.2}×).",
            verdict(v2.p999_us <= 2.0 * v1.p999_us),
            ms(v2.p999_us),
            ms(v1.p999_us),
            ratio(v2.p999_us, v1.p999_us)
        ));
    }
    for every in [20000, 0] {
        let cells: Vec<&Figures> = parallax.iter().filter_map(|v| get(every, v)).collect();
        if cells.is_empty() {
            continue;
        }
        let max_ok = cells.iter().all(|f| f.max_us <= target_us);
        let p999_ok = cells.iter().all(|f| f.p999_us <= 10_000.0);
        let list: Vec<String> = cells
            .iter()
            .map(|c| format!("{} {} / {}", c.variant, ms(c.max_us), ms(c.p999_us)))
            .collect();
        out.push(format!(
            "{}: slowest request ≤ {} ms: {}; p99.9 ≤ 10 ms: {} (slowest / p99.9: {}).",
            if every == 0 {
                "No FLUSH (parallax-v2's timer commits only)".to_string()
            } else {
                format!("FLUSH every {every}")
            },
            STALL_TARGET.as_millis(),
            verdict(max_ok),
            verdict(p999_ok),
            list.join(", ")
        ));
    }
    for v in r.tenant_verdicts() {
        let get = |noisy| {
            r.tenants
                .iter()
                .find(|t| t.system == v.system && t.noisy == noisy)
        };
        let (Some(with), Some(without)) = (get(true), get(false)) else {
            continue;
        };
        out.push(format!(
            "Four tenants, {}: the quiet tenants' p99 with the noisy one within {:.1}× of \
             without: {} ({} against {}, {:.2}×); no quiet request ≥ {} ms: {} (slowest {} \
             with, {} without; {} and {} requests at {} ms or more). Their IOPS with the noisy \
             one: {:.2}× of without.",
            v.system,
            TENANT_P99_RATIO,
            verdict(v.p99_met),
            ms(with.quiet_p99_us),
            ms(without.quiet_p99_us),
            v.p99_ratio,
            STALL_TARGET.as_millis(),
            verdict(v.stall_met),
            ms(with.quiet_max_us),
            ms(without.quiet_max_us),
            with.quiet_over_target,
            without.quiet_over_target,
            STALL_TARGET.as_millis(),
            ratio(with.quiet_iops, without.quiet_iops),
        ));
    }
    for why in &r.tenants_skipped {
        out.push(format!("Four tenants, not run: {why}."));
    }
    if r.figures.is_empty() {
        out.push("Not run: the single-disk cells (`--cells single`).".into());
    }
    if r.tenants.is_empty() {
        out.push("Not run: the four-tenant cell (`--cells tenants`).".into());
    }
    if r.figures.iter().any(|f| f.io_errors > 0) || r.tenants.iter().any(|t| t.io_errors > 0) {
        out.push("**Some requests failed (I/O errors): the run is not clean.**".into());
    }
    out
}

/// Why the goals are not met where they are not, at this revision: from the code and earlier
/// profiles, not from the run the figures come from.
const NOTES: &str = "Where the stalls come from, at this revision (from the code, \
ARCHITECTURE.md's *Concurrent writes, commits and grants*; not profiled in this run):

- A commit (FLUSH, parallax-v2's timer, a mover step) captures under the version's state lock: \
  it waits for the data writes in flight, writes the annotation and checksum pages the writes \
  touched into the tree (parallax-v2), and takes the dirty nodes; requests wait for that part. \
  It then writes the nodes, syncs the tier file and commits the root record (a metadata slot \
  write and its own `fdatasync`) without the state lock, but commits are serialised, so a FLUSH \
  that arrives while one runs waits for it, and the queue that sent it issues nothing until it \
  completes (FLUSH latencies are not in the tables; the IOPS show them).
- A request that finds no free block grants an extent for itself under the state lock when the \
  reserve thread has fallen behind (a hole punched over the extent and a metadata commit; no \
  sync of the tier file). With no FLUSH nothing superseded is freed, so copy-on-write takes a \
  new extent every 16384 4 KiB writes.
- Every disk of a store shares its tier files, and with buffered I/O `fdatasync` of a tier file \
  writes back every dirty page of it, whichever disk wrote it: in the four-tenant cell a quiet \
  tenant's FLUSH writes back the noisy tenant's megabytes. Direct I/O (`--store-cache none`, \
  which serves the stores with `--cache none`) is the design's answer (ARCHITECTURE.md, *Tenant isolation*). Raw \
  images and qemu-storage-daemon's files are one file per disk; with direct I/O the noisy \
  tenant's writes still compete for the device, as qemu-storage-daemon's rows show.
- On a machine as loaded as the one below (the load averages), every figure carries scheduling \
  delays: raw's own requests take 50 ms and more there.";

/// The BENCHMARKS.md section.
pub fn section(r: &CommitsResult, machine: &Machine, command: &str, when: &str) -> String {
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
        "Load averages (1, 5, 15 min) at the start: {}; at the end: {}.\n",
        r.load_before, r.load_after
    );
    let cache = match &r.store_cache {
        Some(m) => format!("the store daemons ran with `--cache {m}`"),
        None => "the store daemons ran with the default cache mode (buffered)".into(),
    };
    if !r.figures.is_empty() {
        let _ = writeln!(
            s,
            "**One disk.** A raw image (`serve --image`) and a store holding a parallax-v1 and a \
             parallax-v2 disk (`serve --store`, parallax-v2's annotation timer at its default \
             5 s), each of {}, written in full first (4 KiB sequential writes). Then per FLUSH \
             interval, randwrite 4 KiB QD32 on 2 queues for {:.0} s on each in turn (the load \
             generator, one thread per queue; a FLUSH every N writes per queue after that \
             queue's requests in flight complete; FLUSH latencies are not in the figures, the \
             requests waiting behind them are); {cache}. Latencies run from submission to \
             completion.\n",
            format_size(r.size),
            r.duration_s
        );
        s.push_str(&single_table(r));
        s.push('\n');
    }
    if !r.tenants.is_empty() {
        let _ = writeln!(
            s,
            "**Four tenants.** Four disks of {} each on one system, each on one queue and \
             written in full first: four raw images (one `serve --image` each: the baseline, \
             no shared file), one store of four parallax-v1 disks and one of four parallax-v2 \
             disks (one `serve --store` each; {cache}), and qemu-storage-daemon serving the raw \
             images (`cache.direct=on,aio=io_uring`, an `--object iothread` per export). Tenant \
             0, the noisy one, writes 1 MiB sequentially at QD8 with a FLUSH every {} writes; \
             tenants 1 to 3, the quiet ones, randwrite 4 KiB QD8 with a FLUSH every {} writes; \
             all four start together and run {:.0} s. Then the three quiet tenants alone, as \
             long, with the same offsets. The quiet figures are over the three tenants' \
             requests together.\n",
            format_size(r.size),
            NOISY_FLUSH_EVERY,
            QUIET_FLUSH_EVERY,
            r.duration_s
        );
        s.push_str(&tenant_table(r));
        s.push('\n');
    }
    let _ = writeln!(s, "Against the goals:\n");
    for g in goals(r) {
        let _ = writeln!(s, "- {g}");
    }
    let _ = writeln!(s, "\n{NOTES}");
    let _ = writeln!(s, "\n{END}");
    s
}

/// Rewrites the section of the Markdown file `path` (created if missing).
pub fn write_section(path: &Path, section: &str) -> Result<(), CompareError> {
    crate::section::write(path, section, BEGIN, END, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: &str, every: u64, iops: f64) -> Figures {
        Figures {
            variant: v.to_string(),
            flush_every: every,
            iops,
            p99_us: 900.0,
            p999_us: 1500.0,
            max_us: 40_000.0,
            io_errors: 0,
        }
    }

    fn result(figures: Vec<Figures>, tenants: Vec<TenantRun>) -> CommitsResult {
        CommitsResult {
            size: 1 << 30,
            duration_s: 10.0,
            figures,
            tenants,
            tenants_skipped: Vec::new(),
            store_cache: None,
            load_before: "0.10 0.20 0.30".into(),
            load_after: "0.40 0.50 0.60".into(),
            runtime_s: 30.0,
        }
    }

    fn tenant(system: &str, noisy: bool, p99_us: f64, max_us: f64, over: u64) -> TenantRun {
        TenantRun {
            system: system.to_string(),
            noisy,
            quiet_iops: 3000.0,
            quiet_p99_us: p99_us,
            quiet_p999_us: p99_us * 2.0,
            quiet_max_us: max_us,
            quiet_each_p99_us: vec![p99_us; 3],
            quiet_each_max_us: vec![max_us; 3],
            quiet_over_target: over,
            noisy_mb_s: if noisy { 400.0 } else { 0.0 },
            noisy_max_us: if noisy { 30_000.0 } else { 0.0 },
            noisy_flushes: if noisy { 2 } else { 0 },
            io_errors: 0,
        }
    }

    #[test]
    fn the_table_divides_by_raw_of_the_same_interval() {
        let r = result(
            vec![f("raw", 32, 1000.0), f("parallax-v1", 32, 900.0)],
            Vec::new(),
        );
        let t = tables(&r);
        assert!(
            t.contains("| 32 | parallax-v1 | 900 | 0.90 | 0.9 ms | 1.5 ms | 40.0 ms | 0 |"),
            "{t}"
        );
    }

    #[test]
    fn single_disk_goals_state_met_and_not_met() {
        let mut slow = f("parallax-v2", 32, 800.0);
        slow.max_us = 60_000.0;
        let r = result(
            vec![f("raw", 32, 1000.0), f("parallax-v1", 32, 950.0), slow],
            Vec::new(),
        );
        let g = goals(&r);
        assert_eq!(
            g[0],
            "FLUSH every 32: IOPS ≥ 0.9× raw: **not met** (parallax-v1 0.95×, parallax-v2 \
             0.80×); slowest request ≤ 50 ms: **not met** (parallax-v1 40.0 ms, parallax-v2 \
             60.0 ms; raw 40.0 ms)."
        );
        assert!(
            g.iter().any(|l| l.contains("the four-tenant cell")),
            "{g:?}"
        );
    }

    #[test]
    fn tenant_verdicts_compare_p99_with_and_without_the_noisy_tenant() {
        let r = result(
            Vec::new(),
            vec![
                tenant("parallax-v1", true, 1400.0, 20_000.0, 0),
                tenant("parallax-v1", false, 1000.0, 10_000.0, 0),
                tenant("parallax-v2", true, 1600.0, 70_000.0, 3),
                tenant("parallax-v2", false, 1000.0, 10_000.0, 0),
                // A system that ran only one way has no verdict.
                tenant("raw", true, 1000.0, 1000.0, 0),
            ],
        );
        let v = r.tenant_verdicts();
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].system, "parallax-v1");
        assert!(v[0].p99_met && v[0].stall_met, "{v:?}");
        assert!((v[0].p99_ratio - 1.4).abs() < 1e-9);
        assert_eq!(v[1].system, "parallax-v2");
        assert!(!v[1].p99_met && !v[1].stall_met, "{v:?}");
        let g = goals(&r).join("\n");
        assert!(
            g.contains(
                "Four tenants, parallax-v2: the quiet tenants' p99 with the noisy one within \
                 1.5× of without: **not met** (1.6 ms against 1.0 ms, 1.60×); no quiet request \
                 ≥ 50 ms: **not met** (slowest 70.0 ms with, 10.0 ms without; 3 and 0 requests \
                 at 50 ms or more). Their IOPS with the noisy one: 1.00× of without."
            ),
            "{g}"
        );
        assert!(g.contains("Not run: the single-disk cells"), "{g}");
        let t = tables(&r);
        assert!(
            t.contains("| parallax-v2 | running | 3000 | 1.6 ms | 3.2 ms | 70.0 ms | 3 | 1.6 / 70.0, 1.6 / 70.0, 1.6 / 70.0 ms | 400 | 30.0 ms | 2 | 0 |"),
            "{t}"
        );
        assert!(
            t.contains("| parallax-v2 | absent | 3000 | 1.0 ms | 2.0 ms | 10.0 ms | 0 | 1.0 / 10.0, 1.0 / 10.0, 1.0 / 10.0 ms | – | – | – | 0 |"),
            "{t}"
        );
    }

    #[test]
    fn section_names_the_store_cache_mode_and_keeps_its_markers() {
        let mut r = result(
            vec![f("raw", 32, 1000.0)],
            vec![
                tenant("raw", true, 1000.0, 1000.0, 0),
                tenant("raw", false, 1000.0, 1000.0, 0),
            ],
        );
        r.store_cache = Some("none".into());
        let m = Machine::default();
        let s = section(&r, &m, "cmd", "now");
        assert!(s.starts_with(&format!("\n{BEGIN}\n")), "{s}");
        assert!(s.trim_end().ends_with(END), "{s}");
        assert!(
            s.contains("the store daemons ran with `--cache none`"),
            "{s}"
        );
        assert!(s.contains("**Four tenants.**"), "{s}");
        assert!(
            s.contains("Load averages (1, 5, 15 min) at the start: 0.10 0.20 0.30; at the end: 0.40 0.50 0.60."),
            "{s}"
        );
    }
}
