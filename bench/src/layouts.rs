//! The layout sections of `dovetail-bench compare`: dovetail serving the same data through
//! different layouts (the raw image against parallax-v1 in a store) and, per validation policy,
//! through a Tee, each against its single-version baseline measured in the same run.
//!
//! Every section is a list of *variants* (how the daemon serves the disk) and a list of cells;
//! each cell runs on every variant back to back, the first variant being the baseline the others
//! are divided by. Store disks are imported from the comparison's backing file once, before the
//! first cell, so every variant reads the same bytes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::compare::Cell;
use crate::compare::{
    fmt_iops, ratio, run_vhost, sync_dir, CompareError, CompareOptions, Daemon, Measured, System,
};
use crate::load::Pattern;

/// How one variant is served.
#[derive(Debug, Clone)]
pub enum Serve {
    /// `dovetail serve --image IMG`: the raw layout on the comparison's backing file.
    Image,
    /// `dovetail serve --store DIR --disk NAME=SOCK`.
    Disk(String),
}

/// One way of serving the disk.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Column name.
    pub name: String,
    pub serve: Serve,
    /// `dovetail` commands run once, after the variant's store disk is created and before the
    /// backing file is imported into it (e.g. attaching a candidate, which then gets the data
    /// through the Tee), `{dir}` standing for the store directory.
    pub setup: Vec<Vec<String>>,
    /// `dovetail` commands run before each of the variant's cells, with no daemon running (e.g.
    /// setting the Tee's policy), `{dir}` standing for the store directory.
    pub before_cell: Vec<Vec<String>>,
}

/// What a section measures.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    /// Markdown paragraph(s) explaining the section.
    pub intro: String,
    /// Markdown after the tables: what bounds the figures (from profiles, not from this run).
    pub notes: String,
    pub variants: Vec<Variant>,
    pub cells: Vec<Cell>,
    pub targets: Vec<Target>,
}

/// A goal for one variant against the baseline, checked on the cells it applies to.
#[derive(Debug, Clone)]
pub struct Target {
    pub variant: usize,
    /// Only cells of this pattern (all cells when `None`).
    pub only: Option<Pattern>,
    /// The least acceptable `variant IOPS / baseline IOPS` (for a time bound of `t`× the
    /// baseline's time for the same work, `1 / t`).
    pub min_ratio: f64,
    /// The goal, as stated in the write-up.
    pub text: String,
    /// Show each cell as the time ratio (baseline IOPS / variant IOPS, ≤ `1 / min_ratio`)
    /// instead of the IOPS ratio.
    pub as_time: bool,
}

/// A section's figures: `figures[cell][variant]`.
#[derive(Debug, Clone)]
pub struct SectionResult {
    pub section: Section,
    pub figures: Vec<Vec<Measured>>,
}

fn cell(pattern: Pattern, block_size: u32, iodepth: u16, queues: usize) -> Cell {
    Cell {
        pattern,
        block_size,
        iodepth,
        queues,
    }
}

/// The section comparing parallax-v1 with the raw layout.
pub fn parallax_section() -> Section {
    Section {
        title: "Layouts: parallax-v1 against raw".into(),
        intro: "The same bytes served by dovetail through the raw layout (the backing file \
                itself, `serve --image`) and through parallax-v1 in a store (`store create`, \
                `disk create`, `disk import` from the backing file, then `serve --store DIR \
                --disk NAME=SOCK`). parallax-v1 finds every 4 KiB block through its radix tree \
                (nodes cached in memory, 16 MiB by default) and reads it from the store's data \
                file through the page cache. Writes that land on committed blocks are \
                copy-on-write: they allocate a new block and change the tree. No FLUSH is sent, \
                so no commit runs during a cell."
            .into(),
        notes: "What is known of the gaps: 4 KiB reads pay one tree lookup per block (two \
                cached nodes, under shared locks) on top of the same `preadv` into guest memory \
                as raw, which shows at queue depth 32 where the rest of the path is cheap; 1 MiB \
                writes copy the guest's data once into a scratch buffer and allocate and link \
                256 blocks per request, where raw hands the guest's buffers to `pwritev` (seen \
                in a `perf` profile of the daemon). Not yet explained: 1 MiB reads (the same \
                `preadv` per run of blocks as raw, split across two threads the same way; a \
                one-queue run by hand reached 7.1 GB/s), and raw's slow random writes in this \
                section (below its figure in the throughput table above), where parallax-v1 \
                writes to fresh blocks instead of overwriting in place."
            .into(),
        variants: vec![
            Variant {
                name: "raw".into(),
                serve: Serve::Image,
                setup: Vec::new(),
                before_cell: Vec::new(),
            },
            Variant {
                name: "parallax-v1".into(),
                serve: Serve::Disk("plx".into()),
                setup: Vec::new(),
                before_cell: Vec::new(),
            },
        ],
        cells: vec![
            cell(Pattern::RandRead, 4096, 1, 1),
            cell(Pattern::RandRead, 4096, 32, 1),
            cell(Pattern::RandRead, 4096, 32, 2),
            cell(Pattern::RandWrite, 4096, 32, 1),
            cell(Pattern::RandWrite, 4096, 32, 2),
            cell(Pattern::Read, 1 << 20, 8, 1),
            cell(Pattern::Write, 1 << 20, 8, 1),
        ],
        targets: vec![Target {
            variant: 1,
            only: Some(Pattern::RandRead),
            min_ratio: 0.85,
            text: "4 KiB random reads on parallax-v1 reach ≥ 0.85× the raw layout's IOPS".into(),
            as_time: false,
        }],
    }
}

/// The store disks the sections serve (each imported from the backing file).
fn store_disks(sections: &[Section]) -> Vec<String> {
    let mut disks: Vec<String> = sections
        .iter()
        .flat_map(|s| &s.variants)
        .filter_map(|v| match &v.serve {
            Serve::Disk(d) => Some(d.clone()),
            Serve::Image => None,
        })
        .collect();
    disks.sort();
    disks.dedup();
    disks
}

pub(crate) fn dovetail_cmd(dovetail: &Path, args: &[String]) -> Result<(), CompareError> {
    let out = Command::new(dovetail)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| CompareError::Io {
            what: format!("run {} {}", dovetail.display(), args.join(" ")),
            source,
        })?;
    if !out.status.success() {
        return Err(CompareError::Tool {
            tool: format!("dovetail {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Creates the store in `dir` with every disk the sections serve, imported from `image`, then
/// runs the variants' setup commands.
fn prepare_store(
    dovetail: &Path,
    dir: &Path,
    image: &Path,
    size: u64,
    sections: &[Section],
) -> Result<(), CompareError> {
    let _ = std::fs::remove_dir_all(dir);
    let disks = store_disks(sections);
    let s = |v: &str| v.to_string();
    let d = dir.display().to_string();
    // Room for every disk twice over (copy-on-write keeps a committed and a new copy of each
    // block rewritten between commits), plus candidates and their metadata.
    let extent = 64u64 << 20;
    let store_size = (size.div_ceil(extent) * 3 * (disks.len() as u64 * 2 + 1) + 2) * extent;
    dovetail_cmd(
        dovetail,
        &[
            s("store"),
            s("create"),
            d.clone(),
            s("--size"),
            store_size.to_string(),
        ],
    )?;
    for disk in &disks {
        eprintln!("importing the backing file into store disk {disk} ...");
        dovetail_cmd(
            dovetail,
            &[
                s("disk"),
                s("create"),
                d.clone(),
                disk.clone(),
                s("--size"),
                size.to_string(),
            ],
        )?;
        // Setup (e.g. attaching a candidate) comes before the import, so a Tee's candidate
        // gets the data through the Tee.
        for v in sections.iter().flat_map(|s| &s.variants) {
            if matches!(&v.serve, Serve::Disk(x) if x == disk) {
                for cmd in &v.setup {
                    let args: Vec<String> = cmd.iter().map(|a| a.replace("{dir}", &d)).collect();
                    dovetail_cmd(dovetail, &args)?;
                }
            }
        }
        dovetail_cmd(
            dovetail,
            &[
                s("disk"),
                s("import"),
                d.clone(),
                disk.clone(),
                s("--from"),
                image.display().to_string(),
            ],
        )?;
    }
    sync_dir(dir)
}

fn start(
    opts: &CompareOptions,
    dovetail: &Path,
    image: &Path,
    store: &Path,
    variant: &Variant,
    queues: usize,
) -> Result<(Daemon, PathBuf), CompareError> {
    let socket = opts.dir.join("layout.sock");
    let mut cmd = Command::new(dovetail);
    cmd.arg("serve");
    match &variant.serve {
        Serve::Image => {
            cmd.arg("--image").arg(image).arg("--socket").arg(&socket);
        }
        Serve::Disk(disk) => {
            cmd.arg("--store")
                .arg(store)
                .arg("--disk")
                .arg(format!("{disk}={}", socket.display()));
        }
    }
    cmd.arg("--queues").arg(queues.to_string());
    let d = Daemon::spawn("dovetail", cmd, &socket, &opts.dir.join("layout.log"), None)?;
    Ok((d, socket))
}

/// Measures every section (the backing file `image` must exist).
pub fn run_sections(
    opts: &CompareOptions,
    dovetail: &Path,
    image: &Path,
    sections: &[Section],
) -> Result<Vec<SectionResult>, CompareError> {
    if sections.is_empty() {
        return Ok(Vec::new());
    }
    let store = opts.dir.join("store");
    prepare_store(dovetail, &store, image, opts.size, sections)?;
    let mut out = Vec::new();
    for section in sections {
        let mut figures = Vec::new();
        for c in &section.cells {
            let mut row = Vec::new();
            for v in &section.variants {
                let d = store.display().to_string();
                for cmd in &v.before_cell {
                    let args: Vec<String> = cmd.iter().map(|a| a.replace("{dir}", &d)).collect();
                    dovetail_cmd(dovetail, &args)?;
                }
                sync_dir(&store)?;
                let (daemon, socket) = start(opts, dovetail, image, &store, v, c.queues)?;
                let m = run_vhost(
                    System::Dovetail,
                    &socket,
                    daemon.pid(),
                    c,
                    opts.duration,
                    Vec::new(),
                    false,
                )?;
                drop(daemon);
                eprintln!(
                    "{:<24} {:<28} {:>10.0} IOPS {:>9.1} MB/s  p50 {:>8.1} us  p99 {:>8.1} us",
                    c.label(),
                    v.name,
                    m.iops,
                    m.mb_per_s,
                    m.p50,
                    m.p99
                );
                row.push(m);
            }
            figures.push(row);
        }
        out.push(SectionResult {
            section: section.clone(),
            figures,
        });
    }
    let _ = std::fs::remove_dir_all(&store);
    Ok(out)
}

/// The Markdown of the sections.
pub fn markdown(results: &[SectionResult]) -> String {
    let mut s = String::new();
    for r in results {
        let sec = &r.section;
        let _ = writeln!(s, "\n## {}\n\n{}\n", sec.title, sec.intro);
        let base = &sec.variants[0].name;
        let mut head = String::from("| cell |");
        let mut rule = String::from("| --- |");
        for v in &sec.variants {
            let _ = write!(head, " {} |", v.name);
            rule.push_str(" ---: |");
        }
        for v in &sec.variants[1..] {
            let _ = write!(head, " {}/{base} |", v.name);
            rule.push_str(" ---: |");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for (c, row) in sec.cells.iter().zip(&r.figures) {
            let show = |m: &Measured| {
                if c.block_size >= 1 << 20 {
                    format!("{:.0} MB/s", m.mb_per_s)
                } else {
                    format!("{} IOPS", fmt_iops(m.iops))
                }
            };
            let mut line = format!("| {} |", c.label());
            for m in row {
                let _ = write!(line, " {} |", show(m));
            }
            for m in &row[1..] {
                let _ = write!(line, " {:.2} |", ratio(m.iops, row[0].iops));
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(s, "\nLatency, µs p50 / p99:\n");
        let mut head = String::from("| cell |");
        let mut rule = String::from("| --- |");
        for v in &sec.variants {
            let _ = write!(head, " {} |", v.name);
            rule.push_str(" --- |");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for (c, row) in sec.cells.iter().zip(&r.figures) {
            let mut line = format!("| {} |", c.label());
            for m in row {
                let _ = write!(line, " {:.1} / {:.1} |", m.p50, m.p99);
            }
            let _ = writeln!(s, "{line}");
        }
        for t in &sec.targets {
            let cells: Vec<(String, f64)> = sec
                .cells
                .iter()
                .zip(&r.figures)
                .filter(|(c, _)| t.only.is_none_or(|p| p == c.pattern))
                .filter_map(|(c, row)| {
                    Some((c.label(), ratio(row.get(t.variant)?.iops, row[0].iops)))
                })
                .collect();
            let ok = !cells.is_empty() && cells.iter().all(|(_, r)| *r >= t.min_ratio);
            let list: Vec<String> = cells
                .iter()
                .map(|(l, r)| {
                    let shown = if t.as_time { 1.0 / r.max(1e-9) } else { *r };
                    format!(
                        "{l} {shown:.2}×{}",
                        if *r >= t.min_ratio { "" } else { " ✗" }
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "\n- Target: {}: {} ({}).",
                t.text,
                if ok { "met" } else { "**not met**" },
                list.join(", ")
            );
        }
        if !sec.notes.is_empty() {
            let _ = writeln!(s, "\n{}", sec.notes);
        }
    }
    s
}

/// The Tee section: each validation policy against the single version (the paper's Figure 3).
pub fn tee_section() -> Section {
    let tee_cmd = |p: &str| {
        [
            "disk",
            "tee",
            "{dir}",
            "tee",
            "--candidate",
            "parallax-v1",
            "--policy",
            p,
        ]
        .map(String::from)
        .to_vec()
    };
    let mut variants = vec![Variant {
        name: "single".into(),
        serve: Serve::Disk("plx".into()),
        setup: Vec::new(),
        before_cell: Vec::new(),
    }];
    let policies = [
        "sync-cross-checks",
        "sync-read-checks",
        "async-old-primary",
        "barrier-writes-async",
        "async-new-primary",
        "lazy-hashes",
        "mirror-only",
    ];
    for p in policies {
        variants.push(Variant {
            name: p.into(),
            serve: Serve::Disk("tee".into()),
            setup: vec![tee_cmd("sync-cross-checks")],
            before_cell: vec![tee_cmd(p)],
        });
    }
    let index = |p: &str| policies.iter().position(|q| *q == p).map_or(0, |i| i + 1);
    let target = |p: &str, t: f64| Target {
        variant: index(p),
        only: None,
        min_ratio: 1.0 / t,
        text: format!("{p} takes ≤ {t:.1}× the single version's time for the same work"),
        as_time: true,
    };
    Section {
        title: "The Tee: each validation policy against the single version".into(),
        intro: "A parallax-v1 disk served alone (*single*) and a second disk served through a \
                Tee whose candidate is a new parallax-v1 version of it. The teed disk is \
                created, teed (`disk tee DIR tee --candidate parallax-v1`) and then imported \
                through its Tee, so the candidate holds every block and every read of the \
                validating policies is checked; before each cell its policy is set with `disk \
                tee DIR tee --policy P` (same candidate). Both disks hold the same bytes and stay \
                in the page cache. Ratios are IOPS against *single*; the time a policy takes for \
                the same work is the inverse (the analogue of the Dovetail paper's Figure 3, \
                where 2 means twice as long)."
            .into(),
        notes: "What bounds the Tee here. From a `perf` profile of the daemon under mirrored \
                4 KiB writes: both versions live in the same store data file, so their buffered \
                writes serialise on that file's inode lock (`rwsem_spin_on_owner` is the top \
                kernel symbol). By design: the candidate's writes and background checks run on \
                one stream thread per disk, and the synchronous policies read both versions one \
                after the other and compare every byte before completing; the machine's two \
                CPUs are shared by the load generator, the queue worker, the stream thread and \
                kernel writeback. Reads under mirror-only and lazy-hashes go to the trusted \
                version alone (zero copy), so their read cells should match *single*; their \
                1 MiB read gap is not explained yet."
            .into(),
        variants,
        cells: vec![
            cell(Pattern::RandRead, 4096, 32, 1),
            cell(Pattern::RandWrite, 4096, 32, 1),
            cell(Pattern::Read, 1 << 20, 8, 1),
            cell(Pattern::Write, 1 << 20, 8, 1),
        ],
        targets: vec![
            target("mirror-only", 1.3),
            target("lazy-hashes", 1.1),
            target("sync-cross-checks", 2.0),
        ],
    }
}

/// Every section `compare` measures.
pub fn sections() -> Vec<Section> {
    vec![parallax_section(), tee_section()]
}
