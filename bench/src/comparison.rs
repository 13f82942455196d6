//! `dovetail-bench compare`: host fio, qemu-storage-daemon and dovetail on one backing file,
//! under the same workloads, written up as BENCHMARKS.md with a chart.
//!
//! Every cell runs on every system back to back (cell-major order), so the systems see the same
//! page cache and dirty state. Each vhost-user daemon is started fresh for its cell and stopped
//! after it, and the file is fsynced between cells so a write cell's dirty pages do not spill
//! into the next one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chart::{bar_chart, Series};
use crate::compare::{
    build_dovetail, cells, cpu_count, fmt_iops, io, machine, prepare_image, ratio, run_fio,
    run_vhost, start_backend, sync_file, utc_now, Cell, CompareError, CompareOptions, Machine,
    Measured, Overhead, System,
};
use crate::load::Pattern;
use crate::units::format_size;

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
    s.push_str(&crate::layouts::markdown(&results.layouts));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
