//! `dovetail-bench seccomp`: what the daemon's seccomp filters cost a busy disk.
//!
//! One backing file, `dovetail serve --image FILE --cache none` started anew for every run,
//! with `--seccomp off` and `--seccomp trap` alternating (off, trap, off, trap, ...) so both see
//! the same device and page-cache state over the run; each run measures 4 KiB random reads and
//! then 4 KiB random writes at queue depth 32 on one queue with the load generator. Reported:
//! the mean IOPS of each mode and cell, the trap/off ratio, and the daemon's CPU per request.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::compare::{prepare_image, run_vhost, Cell, CompareError, Daemon, System};
use crate::load::Pattern;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct SeccompOptions {
    pub dovetail: PathBuf,
    pub dir: PathBuf,
    pub size: u64,
    pub duration: Duration,
    /// Runs of each mode.
    pub rounds: u32,
}

/// One cell's figures for one mode.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    pub cell: String,
    pub mode: String,
    /// IOPS of each run.
    pub iops: Vec<f64>,
    /// The daemon's CPU, % of one core, per run.
    pub backend_cpu: Vec<f64>,
    pub io_errors: u64,
}

impl CellResult {
    pub fn mean_iops(&self) -> f64 {
        self.iops.iter().sum::<f64>() / self.iops.len().max(1) as f64
    }

    /// The daemon's CPU microseconds per request, averaged over the runs.
    pub fn cpu_us_per_request(&self) -> f64 {
        let per: Vec<f64> = self
            .iops
            .iter()
            .zip(&self.backend_cpu)
            .filter(|(i, _)| **i > 0.0)
            .map(|(i, c)| c / 100.0 / i * 1e6)
            .collect();
        per.iter().sum::<f64>() / per.len().max(1) as f64
    }
}

pub const MODES: [&str; 2] = ["off", "trap"];

/// Runs the measurement (module docs).
pub fn run(o: &SeccompOptions) -> Result<Vec<CellResult>, CompareError> {
    std::fs::create_dir_all(&o.dir).map_err(|source| CompareError::Io {
        what: format!("create {}", o.dir.display()),
        source,
    })?;
    let image = o.dir.join("seccomp.img");
    prepare_image(&image, o.size)?;
    let cells = [
        Cell {
            pattern: Pattern::RandRead,
            block_size: 4096,
            iodepth: 32,
            queues: 1,
        },
        Cell {
            pattern: Pattern::RandWrite,
            block_size: 4096,
            iodepth: 32,
            queues: 1,
        },
    ];
    let mut out: Vec<CellResult> = cells
        .iter()
        .flat_map(|c| {
            MODES.iter().map(move |m| CellResult {
                cell: c.label(),
                mode: (*m).to_string(),
                iops: Vec::new(),
                backend_cpu: Vec::new(),
                io_errors: 0,
            })
        })
        .collect();
    for round in 0..o.rounds {
        for (mi, mode) in MODES.iter().enumerate() {
            let socket = o.dir.join("seccomp.sock");
            let mut cmd = Command::new(&o.dovetail);
            cmd.arg("serve")
                .arg("--image")
                .arg(&image)
                .arg("--socket")
                .arg(&socket)
                .arg("--cache")
                .arg("none")
                .arg("--seccomp")
                .arg(mode);
            let log = o.dir.join(format!("seccomp-{mode}-{round}.log"));
            let daemon = Daemon::spawn("dovetail", cmd, &socket, &log, None)?;
            for (ci, cell) in cells.iter().enumerate() {
                let m = run_vhost(
                    System::Dovetail,
                    &socket,
                    daemon.pid(),
                    cell,
                    o.duration,
                    Vec::new(),
                    false,
                )?;
                let r = &mut out[ci * MODES.len() + mi];
                r.iops.push(m.iops);
                r.backend_cpu.push(m.backend_cpu.unwrap_or(0.0));
                r.io_errors += m.io_errors;
                eprintln!(
                    "seccomp {mode}, {}, round {}: {:.0} IOPS",
                    cell.label(),
                    round + 1,
                    m.iops
                );
            }
            drop(daemon);
        }
    }
    Ok(out)
}

/// The figures as a Markdown table.
pub fn table(r: &[CellResult]) -> String {
    let mut s = String::from(
        "| cell | `--seccomp off` IOPS | `--seccomp trap` IOPS | trap / off | daemon CPU per request, off / trap | runs each |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for pair in r.chunks(MODES.len()) {
        let (off, trap) = (&pair[0], &pair[1]);
        s.push_str(&format!(
            "| {} | {:.0} ({}) | {:.0} ({}) | {:.3} | {:.1} µs / {:.1} µs | {} |\n",
            off.cell,
            off.mean_iops(),
            off.iops
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            trap.mean_iops(),
            trap.iops
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            trap.mean_iops() / off.mean_iops().max(1e-9),
            off.cpu_us_per_request(),
            trap.cpu_us_per_request(),
            off.iops.len()
        ));
    }
    s
}
