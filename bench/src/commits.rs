//! `dovetail-bench commits`: the request path's stalls under writes with FLUSH and timer
//! commits, raw against parallax-v1 and parallax-v2 side by side in one run.
//!
//! One raw image (`serve --image`) and one store with a parallax-v1 and a parallax-v2 disk
//! (`serve --store`), all of the same size, each written in full first (4 KiB sequential).
//! Then, for each FLUSH interval, randwrite 4 KiB QD32 on 2 queues on each variant in turn:
//! IOPS, p99.9 and the slowest request.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::compare::{sync_dir, CompareError, Daemon, Machine};
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
}

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

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct CommitsResult {
    pub size: u64,
    pub duration_s: f64,
    pub figures: Vec<Figures>,
    pub runtime_s: f64,
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
    std::fs::create_dir_all(&o.dir).map_err(io(format!("create {}", o.dir.display())))?;
    let store = o.dir.join("commits-store");
    let image = o.dir.join("commits-raw.img");
    let _ = std::fs::remove_dir_all(&store);
    let f = std::fs::File::create(&image).map_err(io(format!("create {}", image.display())))?;
    f.set_len(o.size)
        .map_err(io(format!("size {}", image.display())))?;
    drop(f);
    let extent = 64u64 << 20;
    let store_size = (o.size.div_ceil(extent) * 6 + 8) * extent;
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
    for layout in &VARIANTS[1..] {
        dovetail_cmd(
            &o.dovetail,
            &[
                s("disk"),
                s("create"),
                d.clone(),
                s(layout),
                s("--size"),
                o.size.to_string(),
                s("--layout"),
                s(layout),
            ],
        )?;
    }
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
    let _raw = Daemon::spawn("dovetail", raw, &sockets[0], &raw_log, None)?;
    let mut st = Command::new(&o.dovetail);
    st.arg("serve").arg("--store").arg(&store);
    for (v, sock) in VARIANTS[1..].iter().zip(&sockets[1..]) {
        st.arg("--disk").arg(format!("{v}={}", sock.display()));
    }
    st.arg("--queues").arg("2");
    let st_log = o.dir.join("commits-store.log");
    let _st = Daemon::spawn("dovetail", st, &sockets[1], &st_log, None)?;
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
    Ok(CommitsResult {
        size: o.size,
        duration_s: o.duration.as_secs_f64(),
        figures,
        runtime_s: started.elapsed().as_secs_f64(),
    })
}

fn ms(us: f64) -> String {
    format!("{:.1} ms", us / 1000.0)
}

/// The results as a Markdown table.
pub fn tables(r: &CommitsResult) -> String {
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
        let every = if f.flush_every == 0 {
            "never".to_string()
        } else {
            f.flush_every.to_string()
        };
        let _ = writeln!(
            s,
            "| {every} | {} | {:.0} | {:.2} | {} | {} | {} | {} |",
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
        "Machine: {} CPUs ({}), {} of RAM, {}, kernel {}; the files on {}; dovetail revision {}.\n",
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
        "A raw image (`serve --image`) and a store holding a parallax-v1 and a parallax-v2 disk \
         (`serve --store`, parallax-v2's annotation timer at its default 5 s), each of {}, \
         written in full first (4 KiB sequential writes). Then per FLUSH interval, randwrite \
         4 KiB QD32 on 2 queues for {:.0} s on each in turn (the load generator, one thread per \
         queue; a FLUSH every N writes per queue after that queue's requests in flight \
         complete). Latencies run from submission to completion.\n",
        format_size(r.size),
        r.duration_s
    );
    s.push_str(&tables(r));
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

    #[test]
    fn the_table_divides_by_raw_of_the_same_interval() {
        let f = |v: &str, every, iops| Figures {
            variant: v.to_string(),
            flush_every: every,
            iops,
            p99_us: 900.0,
            p999_us: 1500.0,
            max_us: 40_000.0,
            io_errors: 0,
        };
        let r = CommitsResult {
            size: 1 << 30,
            duration_s: 10.0,
            figures: vec![f("raw", 32, 1000.0), f("parallax-v1", 32, 900.0)],
            runtime_s: 30.0,
        };
        let t = tables(&r);
        assert!(
            t.contains("| 32 | parallax-v1 | 900 | 0.90 | 0.9 ms | 1.5 ms | 40.0 ms | 0 |"),
            "{t}"
        );
    }
}
